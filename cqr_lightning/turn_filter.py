"""Which training turns the question as asked already solves, so that GRPO can train on the others.

On the data pack's training split the raw question ranks a gold passage first on 48% of the turns, and copying it
earns a mean rank-incentive reward of 1.57: as much as 40 GRPO steps reached. One of two seeds then learned to
leave most questions unchanged (bench/RESULTS.md). `rl.skip_turns_solved_at_rank` takes those turns out of the RL
stream, leaving the turns where a rewrite has something to gain.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable

from cqr_lightning.records import Turn
from cqr_lightning.retrieval.base import Retriever


def turns_solved_by_question(
    turns: Iterable[Turn], retriever: Retriever, max_rank: int, k: int = 100, batch_size: int = 256
) -> tuple[set[str], int]:
    """Ids of the turns whose question, searched as asked, ranks a gold passage at `max_rank` or better, and the
    number of turns looked at. Turns are read lazily and searched in batches."""
    if max_rank < 1:
        raise ValueError(f"max_rank must be at least 1, got {max_rank}")
    solved: set[str] = set()
    seen = 0
    iterator = iter(turns)
    while batch := list(itertools.islice(iterator, batch_size)):
        seen += len(batch)
        ranks = retriever.best_gold_ranks([t.question for t in batch], [t.positives for t in batch], k=k)
        solved.update(t.id for t, rank in zip(batch, ranks, strict=True) if rank is not None and rank <= max_rank)
    return solved, seen
