"""Export a trained rewriter as one Hugging Face model: the LoRA merged into the base, with its tokenizer.

    python -m cqr_lightning.export model.adapter=runs/X/rl/adapter output_dir=rewriter-hf [dtype=bfloat16]

The folder loads with `AutoModelForCausalLM.from_pretrained` / `AutoTokenizer.from_pretrained` and needs neither
peft nor bitsandbytes. Each merged linear weight is the base weight (dequantized when the adapter was trained on a
4-bit base) plus the LoRA delta, in `dtype`. Its `cqr_rewriter.json` keeps the prompt and search plan, so
`python -m cqr_lightning.rewrite model.name_or_path=rewriter-hf input=...` asks it as it was trained.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from cqr_lightning.config import CONF_DIR, register_resolvers
from cqr_lightning.errors import ConfigError, user_errors_reported
from cqr_lightning.io_utils import atomic_dir
from cqr_lightning.rewriter_card import hydra_command_line_keys, read_card, with_adapter_card, write_card

log = logging.getLogger(__name__)


def exported_card(card: dict[str, Any] | None, dtype: str) -> dict[str, Any] | None:
    """The card of the merged model: its own weights (plain, in `dtype`), the adapter's prompt, search plan and
    inference setting."""
    if card is None:
        return None
    base = {"gguf_file": None, "load_in_4bit": False, "compute_dtype": dtype}
    return {**card, "base_model": base, "merged_from": card.get("base_model")}


def merged_model(policy, dtype: str):
    """A plain transformers model whose linear weights are the policy's base weights plus its LoRA delta."""
    from cqr_lightning.models.loading import DTYPES
    from cqr_lightning.models.merged_sampler import MergedSampler

    model = MergedSampler(policy, dtype=DTYPES[dtype]).model
    for attribute in ("quantization_config", "_pre_quantization_dtype"):  # a 4-bit base's, not the merged weights'
        if hasattr(model.config, attribute):
            delattr(model.config, attribute)
    model.config.dtype = DTYPES[dtype]
    return model


def export_rewriter(cfg: DictConfig) -> Path:
    from cqr_lightning.models.loading import DTYPES, load_policy, load_tokenizer

    adapter = cfg.model.get("adapter")
    if not adapter:
        raise ConfigError("model.adapter: required, the folder of the trained adapter to export")
    if str(cfg.dtype) not in DTYPES:
        raise ConfigError(f"dtype: {cfg.dtype!r} is not one of {sorted(DTYPES)}")
    target = Path(cfg.output_dir)
    if target.exists() and any(target.iterdir()):
        raise ConfigError(f"output_dir: {target} exists and is not empty; choose a new folder")
    if target.exists():
        target.rmdir()
    policy = load_policy(cfg.model, adapter=adapter, trainable=False)
    tokenizer = load_tokenizer(cfg.model)
    model = merged_model(policy, str(cfg.dtype))
    card = exported_card(read_card(adapter), str(cfg.dtype))
    with atomic_dir(target) as staging:
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        if card is not None:
            write_card(staging, card)
    print(f"wrote {target} (LoRA of {adapter} merged into its base, {cfg.dtype})")
    return target


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="export")
def main(cfg: DictConfig) -> None:
    with user_errors_reported():
        cfg = with_adapter_card(cfg, hydra_command_line_keys())
        log.debug("config:\n%s", OmegaConf.to_yaml(cfg))
        export_rewriter(cfg)


register_resolvers()

if __name__ == "__main__":
    main()
