"""Record the data position of the last trained batch so a checkpoint resumes at the next turn."""

from __future__ import annotations

import lightning as L

from data_modules.conversations import StreamPosition, TurnBatch


class StreamPositionCallback(L.Callback):
    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        datamodule = trainer.datamodule
        if isinstance(batch, TurnBatch) and datamodule is not None and hasattr(datamodule, "train_position"):
            datamodule.train_position = batch.position

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module) -> None:
        datamodule = trainer.datamodule
        if datamodule is not None and hasattr(datamodule, "train_position"):
            datamodule.train_position = StreamPosition(datamodule.train_position.epoch + 1, 0)
