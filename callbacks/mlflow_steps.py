"""Keep MLflow's metric points in step with the checkpoints.

Binds the StepAlignedMLFlowLogger to the trainer (so it logs at `global_step`, the steps of `curves.csv`), and
sends the metrics of the step being checkpointed before the checkpoint is written: Lightning sends a step's
metrics only after every `on_train_batch_end` callback, checkpointing included, so without this a kill right after
a checkpoint lost that step's point for good (the resumed run starts after it).
"""

from __future__ import annotations

import lightning as L
from lightning.pytorch.trainer.states import TrainerFn

from cqr_lightning.mlflow_logger import StepAlignedMLFlowLogger


class MLflowStepsCallback(L.Callback):
    def setup(self, trainer: L.Trainer, pl_module, stage: str) -> None:
        for logger in trainer.loggers:
            if isinstance(logger, StepAlignedMLFlowLogger):
                logger.trainer = trainer

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module, checkpoint: dict) -> None:
        if not trainer.is_global_zero or trainer.state.fn != TrainerFn.FITTING or not trainer.loggers:
            return
        connector = trainer._logger_connector  # Lightning has no public "log the pending step metrics now"
        if trainer._results is None or not isinstance(connector._first_loop_iter, bool):
            return  # not inside a training step: nothing is pending
        pending = connector.metrics["log"]
        if pending:
            connector.log_metrics(pending)  # the logger drops them when Lightning sends them again after
