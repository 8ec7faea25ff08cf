"""The non-finite gradient guard on its own: what it measures, drops, counts and refuses."""

from __future__ import annotations

import math

import pytest
import torch

from cqr_lightning.errors import TrainingDiverged
from cqr_lightning.modules.gradient_guard import NonFiniteGradientGuard, gradient_norm


def layer_with_grads(value: float) -> tuple[torch.nn.Linear, torch.optim.Optimizer]:
    layer = torch.nn.Linear(4, 4)
    for param in layer.parameters():
        param.grad = torch.full_like(param, value)
    return layer, torch.optim.AdamW(layer.parameters(), lr=1e-2)


def test_the_norm_of_finite_but_huge_gradients_overflows_to_inf():
    layer, _ = layer_with_grads(1e38)
    assert all(torch.isfinite(p.grad).all() for p in layer.parameters())
    assert gradient_norm(layer.parameters()) == math.inf
    assert gradient_norm(torch.nn.Linear(2, 2).parameters()) == 0.0  # no gradient yet


def test_a_non_finite_step_drops_its_gradients_so_the_optimizer_changes_nothing():
    guard = NonFiniteGradientGuard(max_in_a_row=2, group="rl")
    layer, optimizer = layer_with_grads(float("nan"))
    before = [p.detach().clone() for p in layer.parameters()]
    assert math.isnan(guard.check(layer, optimizer, step=1, lr=1e-2))
    optimizer.step()
    assert all(p.grad is None for p in layer.parameters())
    assert all(torch.equal(a, b) for a, b in zip(before, layer.parameters(), strict=True))
    assert not optimizer.state, "no moments were created for the skipped step"
    assert (guard.skipped, guard.in_a_row) == (1, 1)
    finite, optimizer = layer_with_grads(0.5)
    assert guard.check(finite, optimizer, step=2, lr=1e-2) == pytest.approx(gradient_norm(finite.parameters()))
    assert (guard.skipped, guard.in_a_row) == (1, 0), "a finite step ends the run of failures"


def test_more_failures_in_a_row_than_allowed_stop_naming_the_settings():
    guard = NonFiniteGradientGuard(max_in_a_row=1, group="warmup")
    guard.check(*layer_with_grads(math.inf), step=7, lr=3e-4)
    with pytest.raises(TrainingDiverged, match=r"warmup step 8: .*2 steps in a row.*warmup\.lr \(now 0\.0003\)"):
        guard.check(*layer_with_grads(math.inf), step=8, lr=3e-4)
    with pytest.raises(ValueError, match="rl.max_nonfinite_updates must be 0 or more"):
        NonFiniteGradientGuard(max_in_a_row=-1, group="rl")


def test_steps_a_float16_loss_scaler_handles_are_only_measured():
    guard = NonFiniteGradientGuard(max_in_a_row=0, group="rl")
    layer, optimizer = layer_with_grads(math.inf)
    assert guard.check(layer, optimizer, step=1, lr=1e-2, loss_scaled=True) == math.inf
    assert all(p.grad is not None for p in layer.parameters()), "the scaler, not the guard, skips this step"
    assert (guard.skipped, guard.in_a_row) == (0, 0)
