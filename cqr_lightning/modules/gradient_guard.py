"""A step whose gradient is not finite applies no update, in both training stages.

A NaN or infinite gradient (a bf16 overflow, a learning rate too high) that reaches the optimizer writes NaN into
every LoRA weight it touches, and the next sampling call fails on NaN probabilities. The guard measures the
gradient norm before clipping (an overflowing norm would otherwise scale every gradient to 0 and hide the step's
failure) and, when it is not finite, drops the gradients: torch's and bitsandbytes' optimizers skip parameters
without one, so weights and optimizer moments stay as they were. After more than `max_in_a_row` such steps in a
row training stops with an error naming the settings to change. Under DDP the gradients are all-reduced before
the check, so every process takes the same decision. With float16 mixed precision (`trainer.precision=16-mixed`)
the loss scaler already skips a step with inf gradients and lowers its scale, which happens a few times in a row
at the start of every run by design, so the guard leaves those steps to it.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable

import torch

from cqr_lightning.errors import TrainingDiverged

log = logging.getLogger(__name__)


def gradient_norm(parameters: Iterable[torch.nn.Parameter]) -> float:
    """The L2 norm of the gradients present, in float32 (inf when it overflows, NaN when one is NaN)."""
    norms = [p.grad.detach().float().norm() for p in parameters if p.grad is not None]
    return torch.stack(norms).norm().item() if norms else 0.0


def loss_scaler_active(trainer) -> bool:
    """Whether the Trainer's precision plugin scales the loss (float16 mixed precision's GradScaler)."""
    return getattr(getattr(trainer, "precision_plugin", None), "scaler", None) is not None


class NonFiniteGradientGuard:
    """Counts and drops non-finite steps of one stage (`group`: the config group that names its settings)."""

    def __init__(self, max_in_a_row: int, group: str):
        if max_in_a_row < 0:
            raise ValueError(f"{group}.max_nonfinite_updates must be 0 or more, got {max_in_a_row}")
        self.max_in_a_row = max_in_a_row
        self.group = group
        self.in_a_row = 0
        self.skipped = 0

    def check(self, module: torch.nn.Module, optimizer, step: int, lr: float, loss_scaled: bool = False) -> float:
        """The gradient norm of `module`'s trainable parameters; when it is not finite, the gradients are dropped
        (`optimizer.step()` then changes nothing) and the step is counted, or training stops. `loss_scaled`: a
        float16 loss scaler handles such steps (`loss_scaler_active`), so the norm is only measured."""
        norm = gradient_norm(p for p in module.parameters() if p.requires_grad)
        if math.isfinite(norm) or loss_scaled:
            self.in_a_row = 0
            return norm
        optimizer.zero_grad(set_to_none=True)
        self.skipped += 1
        self.in_a_row += 1
        if self.in_a_row > self.max_in_a_row:
            raise TrainingDiverged(
                f"{self.group} step {step}: the gradient norm was {norm} for {self.in_a_row} steps in a row, so the "
                "policy no longer learns; the adapter of the last checkpoint is intact (no update of these steps was "
                f"applied). Lower {self.group}.lr (now {lr}), set model.upcast_non_quantized=true if it is false, or "
                f"raise {self.group}.max_nonfinite_updates (now {self.max_in_a_row}) to keep skipping such steps"
            )
        log.warning(
            "%s step %d: gradient norm %s, the update is skipped (%d in a row, %d in all; training stops after "
            "%s.max_nonfinite_updates=%d in a row)",
            self.group, step, norm, self.in_a_row, self.skipped, self.group, self.max_in_a_row,
        )  # fmt: skip
        return norm

    def check_step(self, module: torch.nn.Module, optimizer, trainer) -> float:
        """`check` before the Trainer's next optimizer step: its number and learning rate, and whether a float16
        loss scaler handles non-finite steps, read from `trainer` and `optimizer`."""
        lr = optimizer.param_groups[0]["lr"]
        scaled = loss_scaler_active(trainer)
        return self.check(module, optimizer, trainer.global_step + 1, lr, loss_scaled=scaled)
