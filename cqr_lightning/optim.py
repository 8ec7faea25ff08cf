"""Optimizer and learning-rate schedule shared by both stages."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from cqr_lightning.errors import ConfigError

OPTIMIZERS = ("adamw", "paged_adamw_8bit")
SCHEDULES = ("constant", "linear", "cosine")


def build_optimizer(
    params: Iterable[torch.nn.Parameter],
    name: str = "adamw",
    lr: float = 1e-4,
    betas: tuple[float, float] = (0.9, 0.95),
    weight_decay: float = 0.01,
) -> torch.optim.Optimizer:
    params = [p for p in params if p.requires_grad]
    if not params:
        raise ConfigError("no trainable parameters: check model.lora settings")
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=tuple(betas), weight_decay=weight_decay)
    if name == "paged_adamw_8bit":
        import bitsandbytes as bnb

        return bnb.optim.PagedAdamW8bit(params, lr=lr, betas=tuple(betas), weight_decay=weight_decay)
    raise ConfigError(f"optimizer.name '{name}' is not one of {OPTIMIZERS}")


def warmup_then(step: int, warmup_steps: int, total_steps: int | None, schedule: str) -> float:
    """Learning-rate multiplier: linear warm-up over `warmup_steps`, then constant, linear or cosine decay."""
    if schedule not in SCHEDULES:
        raise ConfigError(f"optimizer.schedule '{schedule}' is not one of {SCHEDULES}")
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant" or not total_steps or total_steps <= warmup_steps:
        return 1.0
    progress = min(1.0, (step - warmup_steps) / (total_steps - warmup_steps))
    if schedule == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(
    optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int | None, schedule: str
) -> torch.optim.lr_scheduler.LambdaLR:
    warmup_then(0, warmup_steps, total_steps, schedule)  # validate the name early
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: warmup_then(step, warmup_steps, total_steps, schedule)
    )
