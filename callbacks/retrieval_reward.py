"""The retrieval reward: one batched retrieval per rollout batch, scored with SPEC's reward shaping.

The callback owns the retriever (opened once per process at `setup`, closed at `teardown`) and hands
itself to the module as `pl_module.scorer`.  The module calls `score(...)` for rollouts and
`search(...)` for validation.  Statistics of the last scored batch are logged every step and, every
`table_every_n_steps`, a table of sample rollouts goes to MLflow.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import lightning as L
import torch
from omegaconf import OmegaConf

from cqr_lightning.errors import RetrievalError
from cqr_lightning.formatting import is_copy, parse_response
from cqr_lightning.grpo.rewards import get_reward_function
from cqr_lightning.prompts import THINK_REWRITE
from cqr_lightning.records import Turn
from cqr_lightning.retrieval.base import Retriever

RANK_BUCKETS = (("rank_1", 1, 1), ("rank_2_3", 2, 3), ("rank_4_10", 4, 10), ("rank_11_100", 11, 100))


@dataclass
class RewardBatch:
    rewards: list[float]
    ranks: list[int | None]
    format_ok: list[bool]
    rewrites: list[str | None]
    copies: list[bool] = field(default_factory=list)  # whether each rewrite repeats its question (is_copy)


def reward_statistics(batch: RewardBatch, group_size: int) -> dict[str, float]:
    """Mean/std reward, format failures, gold-rank histogram (shares) and flat groups."""
    n = len(batch.rewards)
    rewards = torch.tensor(batch.rewards, dtype=torch.float64)
    valid_ranks = [r for r, ok in zip(batch.ranks, batch.format_ok, strict=True) if ok]
    stats = {
        "reward_mean": rewards.mean().item(),
        "reward_std": rewards.std().item() if n > 1 else 0.0,
        "format_failure_rate": 1 - sum(batch.format_ok) / n,
        "rewrite_words": sum(len((w or "").split()) for w in batch.rewrites) / n,
    }
    if batch.copies:
        stats["copy_rate"] = sum(batch.copies) / n
    for name, low, high in RANK_BUCKETS:
        stats[f"gold_{name}"] = sum(r is not None and low <= r <= high for r in valid_ranks) / n
    stats["gold_not_found"] = sum(r is None for r in valid_ranks) / n
    if group_size > 1 and n % group_size == 0:
        groups = rewards.reshape(-1, group_size)
        stats["flat_group_share"] = (groups.amax(1) == groups.amin(1)).double().mean().item()
    return stats


def open_reward_retriever(retriever_cfg, corpus_path: str | None, max_query_words: int | None = None) -> Retriever:
    """Open the retriever that scores rewrites, queries cut to `max_query_words`; a failure names what to check."""
    from cqr_lightning.retrieval.factory import open_retriever

    cfg = OmegaConf.to_container(OmegaConf.create(retriever_cfg), resolve=True)
    if max_query_words:
        cfg["max_query_words"] = max_query_words
    try:
        return open_retriever(cfg, corpus_path)
    except Exception as err:
        raise RetrievalError(
            f"could not open retriever '{cfg.get('name')}' over {corpus_path}: {err} "
            "(check retriever=... and data.corpus)"
        ) from err


class RetrievalRewardCallback(L.Callback):
    def __init__(
        self,
        retriever_cfg,
        corpus_path: str | None,
        reward: str = "rank_incentive",
        response_format: str = THINK_REWRITE,
        max_query_words: int | None = None,
        table_every_n_steps: int = 0,
        retriever: Retriever | None = None,
    ):
        self.retriever_cfg = retriever_cfg
        self.corpus_path = corpus_path
        self.reward_name = reward
        self.reward_fn = get_reward_function(reward)
        self.response_format = response_format
        self.max_query_words = max_query_words
        self.table_every_n_steps = table_every_n_steps
        self.retriever = retriever
        self._owns_retriever = retriever is None
        self.depth = int(retriever_cfg.get("k", 100)) if retriever_cfg is not None else 100
        self.last: tuple[list[Turn], list[str], RewardBatch] | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.retriever is None:
            self.retriever = open_reward_retriever(self.retriever_cfg, self.corpus_path, self.max_query_words)
        pl_module.scorer = self

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self._owns_retriever and self.retriever is not None:
            self.retriever.close()
            self.retriever = None

    def best_ranks(self, queries: Sequence[str], turns: Sequence[Turn]) -> list[int | None]:
        """Best gold rank per query; a failing retriever stops training with a clear error."""
        try:
            return self.retriever.best_gold_ranks(queries, [t.positives for t in turns], k=self.depth)
        except Exception as err:
            raise RetrievalError(
                f"retrieval failed while scoring {len(queries)} queries: {err}. Training stopped; the last "
                "checkpoint is intact (resume with ckpt_path=...)."
            ) from err

    def score(self, turns: Sequence[Turn], responses: Sequence[str]) -> RewardBatch:
        """Reward each response (turns[i] is the turn response i answers)."""
        parsed = [parse_response(text, self.response_format) for text in responses]
        scored = [i for i, p in enumerate(parsed) if p.format_ok]
        ranks: list[int | None] = [None] * len(parsed)
        if scored:
            found = self.best_ranks([parsed[i].rewrite for i in scored], [turns[i] for i in scored])
            for i, rank in zip(scored, found, strict=True):
                ranks[i] = rank
        batch = RewardBatch(
            rewards=[self.reward_fn(rank, p.format_ok) for rank, p in zip(ranks, parsed, strict=True)],
            ranks=ranks,
            format_ok=[p.format_ok for p in parsed],
            rewrites=[p.rewrite for p in parsed],
            copies=[is_copy(p.rewrite, turn.question) for p, turn in zip(parsed, turns, strict=True)],
        )
        self.last = (list(turns), list(responses), batch)
        return batch

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if self.last is None or not self.table_every_n_steps:
            return
        if trainer.global_step % self.table_every_n_steps == 0:
            log_rollout_table(trainer, *self.last)


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
