"""A training progress bar counted in optimizer steps out of `max_steps`, also after a resume.

Both stages train on a stream with `max_steps` (Lightning's `max_epochs=-1`), where the stock bar reads
"Epoch 0/-2" and, after a resume, counts the restored batch index against the remaining steps ("6/2"). This one
shows "steps", completed = `trainer.global_step`, total = `max_steps`.
"""

from __future__ import annotations

from lightning.pytorch.callbacks import RichProgressBar


class StepProgressBar(RichProgressBar):
    def _get_train_description(self, current_epoch: int) -> str:
        return "steps"

    @property
    def total_train_batches(self) -> int | float:
        max_steps = self.trainer.max_steps
        return max_steps if max_steps and max_steps > 0 else super().total_train_batches

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if not self.is_disabled and self.train_progress_bar_id is None:  # a resume mid-stream
            self._initialize_train_progress_bar_id()
        self._update(self.train_progress_bar_id, trainer.global_step)
        self._update_metrics(trainer, pl_module)
        self.refresh()


def step_progress_bar() -> list:
    """[StepProgressBar()] where rich is installed (Lightning's own bar otherwise)."""
    from lightning.pytorch.callbacks.progress.rich_progress import _RICH_AVAILABLE

    return [StepProgressBar()] if _RICH_AVAILABLE else []
