"""Log sample GRPO rollouts (context, response, rewrite, reward, gold rank) as MLflow tables.

The callback only observes: it reads what the module's `RetrievalScorer` scored last (`scorer.last`) and, every
`every_n_steps`, writes it as `rollouts/step_NNNNNN.json` to the MLflow run.
"""

from __future__ import annotations

from collections.abc import Sequence

import lightning as L

from cqr_lightning.records import Turn
from cqr_lightning.scoring import RewardBatch


class RolloutTableCallback(L.Callback):
    def __init__(self, every_n_steps: int = 0):
        self.every_n_steps = every_n_steps

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        scorer = getattr(pl_module, "scorer", None)
        if scorer is None or scorer.last is None or not self.every_n_steps:
            return
        if trainer.global_step % self.every_n_steps == 0:
            log_rollout_table(trainer, *scorer.last)


def log_rollout_table(trainer: L.Trainer, turns: Sequence[Turn], responses: Sequence[str], batch: RewardBatch) -> None:
    """Sample rollouts (context, response, rewrite, reward, rank) as an MLflow table artifact."""
    from lightning.pytorch.loggers import MLFlowLogger

    from cqr_lightning.prompts import format_context

    for logger in trainer.loggers:
        if isinstance(logger, MLFlowLogger):
            table = {
                "turn_id": [t.id for t in turns],
                "context": [format_context(t.history) + f"\nQuery: {t.question}" for t in turns],
                "response": list(responses),
                "rewrite": [w or "" for w in batch.rewrites],
                "reward": batch.rewards,
                "rank": [r if r is not None else -1 for r in batch.ranks],
            }
            logger.experiment.log_table(
                logger.run_id, data=table, artifact_file=f"rollouts/step_{trainer.global_step:06d}.json"
            )
