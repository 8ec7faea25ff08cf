"""The retriever contract shared by every backend."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class SearchHit:
    passage_id: str
    score: float


class Retriever(ABC):
    """Ranks corpus passages for a batch of queries.

    `search` returns, for every query, up to `k` hits sorted best first.  Backends
    build or load their index in `__init__` (or a classmethod) and free it in `close`.
    """

    @abstractmethod
    def search(self, queries: Sequence[str], k: int = 100) -> list[list[SearchHit]]: ...

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release the index (JVM searcher, GPU memory...)."""

    def __enter__(self) -> Retriever:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def best_gold_ranks(
        self, queries: Sequence[str], positives: Sequence[Iterable[str]], k: int = 100
    ) -> list[int | None]:
        """1-based best rank of any gold passage per query, None when none is in the top k."""
        runs = self.search(queries, k=k)
        return [best_gold_rank(hits, gold) for hits, gold in zip(runs, positives, strict=True)]


def best_gold_rank(hits: Sequence[SearchHit], gold: Iterable[str]) -> int | None:
    gold_ids = set(gold)
    for rank, hit in enumerate(hits, start=1):
        if hit.passage_id in gold_ids:
            return rank
    return None


def truncate_words(text: str, max_words: int | None) -> str:
    """Keep the first `max_words` whitespace-separated words (SPEC: queries are cut by words, not tokens)."""
    if max_words is None:
        return text
    words = text.split()
    return " ".join(words[:max_words]) if len(words) > max_words else text
