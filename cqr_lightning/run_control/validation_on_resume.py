"""Run, on resume, the validation that a checkpoint's step was due but did not finish.

Lightning writes a step's checkpoint (periodic, or on SIGTERM) at the end of the training step, before that step's
validation, and on resume it counts that validation as done. A run stopped at a validation step would then never
validate there: its curve has a gap and the best adapter misses a candidate. This callback remembers the last step
validated to the end; when a loaded checkpoint's step is due for validation and was not validated, it marks the
validation loop as started and not yet through its first batch, which is Lightning's own state for "restarted
mid-validation", so the resumed run validates that step in full before training on.
"""

from __future__ import annotations

import lightning as L

VAL_PROGRESS = "epoch_loop.val_loop.batch_progress"


def due_for_validation(step: int, interval) -> bool:
    return isinstance(interval, int) and interval > 0 and step > 0 and step % interval == 0


def mark_validation_started(progress: dict) -> None:
    """Lightning's batch progress of a validation that started and processed no batch (its restart test reads the
    totals: ready == started == processed + 1, processed == completed)."""
    for counts in (progress["total"], progress["current"]):
        counts["processed"] = counts["completed"]
        counts["ready"] = counts["started"] = counts["completed"] + 1
    progress["is_last_batch"] = False


class ValidationOnResume(L.Callback):
    def __init__(self):
        self.validated_step: int | None = None

    def on_validation_end(self, trainer: L.Trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self.validated_step = trainer.global_step

    def state_dict(self) -> dict:
        return {"validated_step": self.validated_step}

    def load_state_dict(self, state: dict) -> None:
        self.validated_step = state.get("validated_step")

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module, checkpoint: dict) -> None:
        step = int(checkpoint.get("global_step", 0))
        saved = checkpoint.get("callbacks", {}).get(self.state_key, {})
        loops = checkpoint.get("loops", {}).get("fit_loop", {})
        if VAL_PROGRESS not in loops or not due_for_validation(step, trainer.val_check_interval):
            return
        if saved.get("validated_step") != step:
            mark_validation_started(loops[VAL_PROGRESS])
