"""Policy models: loading (4-bit + LoRA), adapters, generation, and a tiny in-process test model."""

from cqr_lightning.models.generation import GeneratedSample, generate, truncate_at_stop
from cqr_lightning.models.loading import (
    ModelConfig,
    fix_cpu_4bit_gradients,
    load_adapter,
    load_base_model,
    load_policy,
    load_tokenizer,
    model_cache_dir,
    resolve_model_dir,
    save_adapter,
)
from cqr_lightning.models.tiny import build_tiny_model

__all__ = [
    "GeneratedSample",
    "ModelConfig",
    "build_tiny_model",
    "fix_cpu_4bit_gradients",
    "generate",
    "load_adapter",
    "load_base_model",
    "load_policy",
    "load_tokenizer",
    "model_cache_dir",
    "resolve_model_dir",
    "save_adapter",
    "truncate_at_stop",
]
