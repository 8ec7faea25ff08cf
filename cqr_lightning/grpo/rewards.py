"""Per-response rewards for GRPO, computed from the best gold rank of the response's rewrite.

Every reward takes `rank` (the 1-based best rank of any gold passage among the top 100 retrieved for the
rewrite, None when no gold passage is there) and `format_ok` (whether the response passed the format
check). A response that fails the format check gets `FORMAT_FAILURE_REWARD` whatever its rank.

`rank_incentive_reward` is ConvSearch-R1's rank-incentive reward shaping (RIRS); the others use a
retrieval metric directly as the reward, for the paper's ablation.
"""

from __future__ import annotations

import math
from collections.abc import Callable

FORMAT_FAILURE_REWARD = -0.1
RETRIEVAL_DEPTH = 100

RewardFunction = Callable[[int | None, bool], float]


def _check_rank(rank: int | None) -> None:
    if rank is not None and rank < 1:
        raise ValueError(f"rank must be >= 1 (1-based) or None, got {rank}")


def rank_incentive_reward(rank: int | None, format_ok: bool) -> float:
    """2.0 at rank 1 down to 1.0 at rank 10, then (100 - r) / 90 down to 0.0 at rank 100; 0.0 beyond."""
    _check_rank(rank)
    if not format_ok:
        return FORMAT_FAILURE_REWARD
    if rank is None or rank > RETRIEVAL_DEPTH:
        return 0.0
    if rank <= 10:
        return 2.0 - (rank - 1) / 9
    return (RETRIEVAL_DEPTH - rank) / 90


def mrr3_reward(rank: int | None, format_ok: bool) -> float:
    """Reciprocal rank cut at 3: 1 / r for r <= 3, else 0."""
    _check_rank(rank)
    if not format_ok:
        return FORMAT_FAILURE_REWARD
    return 1.0 / rank if rank is not None and rank <= 3 else 0.0


def ndcg3_reward(rank: int | None, format_ok: bool) -> float:
    """NDCG@3 with binary relevance, assuming the turn has exactly one gold passage.

    Only the best gold rank is known, not the ranks of any other gold passages, so the reward treats the
    gold passage at `rank` as the only relevant one: DCG = 1 / log2(r + 1) for r <= 3, and the ideal DCG
    is 1 (that passage at rank 1). With several gold passages this differs from trec_eval's ndcg_cut.3.
    """
    _check_rank(rank)
    if not format_ok:
        return FORMAT_FAILURE_REWARD
    return 1.0 / math.log2(rank + 1) if rank is not None and rank <= 3 else 0.0


def recall10_reward(rank: int | None, format_ok: bool) -> float:
    """1 when a gold passage is in the top 10, else 0 (recall with one gold passage)."""
    _check_rank(rank)
    if not format_ok:
        return FORMAT_FAILURE_REWARD
    return 1.0 if rank is not None and rank <= 10 else 0.0


def recall100_reward(rank: int | None, format_ok: bool) -> float:
    """1 when a gold passage is in the top 100, else 0 (recall with one gold passage)."""
    _check_rank(rank)
    if not format_ok:
        return FORMAT_FAILURE_REWARD
    return 1.0 if rank is not None and rank <= RETRIEVAL_DEPTH else 0.0


REWARD_FUNCTIONS: dict[str, RewardFunction] = {
    "rank_incentive": rank_incentive_reward,
    "mrr@3": mrr3_reward,
    "ndcg@3": ndcg3_reward,
    "recall@10": recall10_reward,
    "recall@100": recall100_reward,
}


def get_reward_function(name: str) -> RewardFunction:
    """The reward function registered under `name` (a key of `REWARD_FUNCTIONS`)."""
    try:
        return REWARD_FUNCTIONS[name]
    except KeyError:
        valid = ", ".join(sorted(REWARD_FUNCTIONS))
        raise ValueError(f"unknown reward function {name!r}; valid names: {valid}") from None
