"""The `trainer` config group: Lightning's own Trainer flags, checked, then passed to `lightning.pytorch.Trainer`.

A key of `conf/trainer/*.yaml` is a Trainer argument. The stages set the flags that belong to their recipe
(`warmup.*`, `rl.*`) or to the run folder themselves, so those are refused here with the setting to use instead.
"""

from __future__ import annotations

import os

from omegaconf import DictConfig, OmegaConf

from cqr_lightning.errors import ConfigError

# Trainer flags a stage sets itself, and where a user sets them instead
STAGE_FLAGS = {
    "max_steps": "rl.max_steps or warmup.epochs",
    "max_epochs": "warmup.epochs",
    "accumulate_grad_batches": "warmup.accumulate_grad_batches (GRPO steps once per rollout batch)",
    "gradient_clip_val": "warmup.gradient_clip_val or rl.max_grad_norm",
    "val_check_interval": "warmup.val_every_n_steps or rl.val_every_n_steps",
    "check_val_every_n_epoch": "warmup.val_every_n_steps or rl.val_every_n_steps",
    "callbacks": "the stage's own callbacks (stages.py)",
    "logger": "the logger group (logger=mlflow | none)",
    "default_root_dir": "run_dir",
    "plugins": "nothing: checkpoints are written by the stage's atomic checkpoint plugin",
    "num_sanity_val_steps": "warmup.validate_before (the stages run no sanity check)",
    "enable_model_summary": "nothing: the stages print no model summary",
}
# process launching that each process loading its own 4-bit model onto its device works with
SUPPORTED_STRATEGIES = ("auto", "ddp")
# mixed precision that autocasts to the dtype the 4-bit layers already compute in
MIXED_PRECISION_FOR = {"bfloat16": "bf16-mixed", "float16": "16-mixed"}
FULL_PRECISION = ("32-true", "32", 32)


def trainer_settings(cfg: DictConfig) -> dict:
    """The `trainer` group as plain data, unset (null) flags left out."""
    flags = OmegaConf.to_container(cfg.trainer, resolve=True) if cfg.get("trainer") is not None else {}
    return {key: value for key, value in flags.items() if value is not None}


def check_trainer_settings(cfg: DictConfig) -> None:
    """ConfigError naming the first `trainer.*` setting that conflicts with the stages or the model."""
    flags = trainer_settings(cfg)
    for key in flags:
        if key in STAGE_FLAGS:
            raise ConfigError(f"trainer.{key} is set by the training stage: use {STAGE_FLAGS[key]}")
    strategy = flags.get("strategy", "auto")
    if not isinstance(strategy, str) or strategy not in SUPPORTED_STRATEGIES:
        raise ConfigError(
            f"trainer.strategy={strategy} is not supported: use auto (one device) or ddp (trainer=ddp), where each "
            "process loads its own 4-bit model on its own device"
        )
    devices, nodes = flags.get("devices", 1), flags.get("num_nodes", 1)
    if strategy == "auto" and (nodes != 1 or (isinstance(devices, int) and devices > 1)):
        raise ConfigError(
            f"trainer.devices={devices} and trainer.num_nodes={nodes} need trainer.strategy=ddp (or trainer=ddp)"
        )
    check_precision(flags.get("precision"), cfg.model)
    check_gpus(str(flags.get("accelerator", "auto")), devices)


def check_gpus(accelerator: str, devices) -> None:
    """Refuse a GPU accelerator torch cannot see, or more devices per node than are visible (Lightning's own errors
    name neither the setting nor the cause)."""
    if accelerator not in ("gpu", "cuda"):
        return
    import torch

    visible = torch.cuda.device_count()
    if visible == 0:
        build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        raise ConfigError(
            f"trainer.accelerator={accelerator}, but torch {torch.__version__} ({build}) sees no GPU: use "
            "trainer.accelerator=cpu (or auto), or run on a machine whose GPU this torch can use"
        )
    if isinstance(devices, int) and devices > visible:
        raise ConfigError(
            f"trainer.devices={devices}, but this machine shows {visible} GPU(s) (CUDA_VISIBLE_DEVICES="
            f"{os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}): lower trainer.devices"
        )


def check_precision(precision, model_cfg) -> None:
    """Refuse a Trainer precision that fights the model's compute dtype.

    The 4-bit layers dequantize into `model.compute_dtype`, and `prepare_model_for_kbit_training` keeps norms in
    float32: a `*-true` precision would cast the whole model (bitsandbytes refuses it for a 4-bit model, and it
    would undo the float32 norms), and autocasting to another half type would compute LoRA in one dtype and the
    4-bit matmuls in another.
    """
    if precision is None or precision in FULL_PRECISION:
        return
    compute_dtype = str(model_cfg.get("compute_dtype", "bfloat16"))
    if compute_dtype == "auto":  # what auto means on this machine
        from cqr_lightning.models.loading import ModelConfig

        compute_dtype = ModelConfig.from_cfg(model_cfg).dtype_name
    matching = MIXED_PRECISION_FOR.get(compute_dtype)
    if str(precision) == matching:
        return
    allowed = "null" + (f" or {matching}" if matching else "")
    raise ConfigError(
        f"trainer.precision={precision} conflicts with model.compute_dtype={compute_dtype} (the dtype the "
        f"4-bit layers compute in): set trainer.precision={allowed}, or change model.compute_dtype"
    )


def trainer_flags(cfg: DictConfig) -> dict:
    """The checked `trainer` group as keyword arguments of `L.Trainer`.

    `strategy: ddp` becomes a DDPStrategy that does not broadcast buffers before each forward: ranks validate and
    sample different numbers of batches (their share of a stream), and a forward that waited for the other ranks
    would hang. The buffers (rotary tables) are identical on every rank anyway.
    """
    check_trainer_settings(cfg)
    flags = trainer_settings(cfg)
    if flags.get("strategy") == "ddp":
        from lightning.pytorch.strategies import DDPStrategy

        flags["strategy"] = DDPStrategy(broadcast_buffers=False)
    return flags
