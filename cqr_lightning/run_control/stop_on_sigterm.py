"""Stop soon after SIGTERM (`kill`, a scheduler's pre-emption) and leave the run resumable.

Lightning turns SIGTERM into a flag that its training loop checks between batches and its predict loop not at
all, and it then exits without a checkpoint. This callback stops every loop at the next batch boundary; in
training it first writes the stage's `last.ckpt`, so rerunning the same command continues from the step that had
just finished instead of the last periodic checkpoint.
"""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import SIGTERMException

log = logging.getLogger(__name__)

SIGTERM_EXIT_CODE = 128 + 15


class StopOnSigterm(L.Callback):
    def __init__(self, last_checkpoint: str | Path | None = None):
        self.last_checkpoint = Path(last_checkpoint) if last_checkpoint is not None else None

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if trainer.received_sigterm:
            raise SIGTERMException(SIGTERM_EXIT_CODE)

    def on_predict_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx: int, dataloader_idx=0):
        if trainer.received_sigterm:
            raise SIGTERMException(SIGTERM_EXIT_CODE)

    def on_exception(self, trainer: L.Trainer, pl_module, exception: BaseException) -> None:
        """Lightning's loops raise SIGTERMException too (between steps, or during validation): save either way."""
        if not isinstance(exception, SIGTERMException) or self.last_checkpoint is None:
            return
        if trainer.state.fn != TrainerFn.FITTING or trainer.global_step == 0:
            return
        trainer.save_checkpoint(self.last_checkpoint)
        log.warning("SIGTERM: saved %s at step %d", self.last_checkpoint, trainer.global_step)
