"""Score queries (one per turn) against a retriever: per-turn ranks and metrics, and their means."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from cqr_lightning.metrics import METRIC_NAMES, aggregate_metrics, per_query_metrics
from cqr_lightning.records import Turn
from cqr_lightning.retrieval.base import Retriever, best_gold_rank

SHARE_NAMES = ("format_ok", "copy_rate")  # shares of turns that some results carry besides the metrics


@dataclass
class TurnResult:
    turn_id: str
    query: str
    best_rank: int | None
    top_ids: list[str]
    metrics: dict[str, float]
    response: str | None = None
    format_ok: bool | None = None

    def to_json(self) -> dict:
        return {
            "id": self.turn_id,
            "query": self.query,
            "best_rank": self.best_rank,
            "top10": self.top_ids[:10],
            **({"response": self.response, "format_ok": self.format_ok} if self.response is not None else {}),
            **self.metrics,
        }


def score_queries(
    turns: Sequence[Turn],
    queries: Sequence[str],
    retriever: Retriever,
    k: int = 100,
    batch_size: int = 256,
) -> list[TurnResult]:
    """Retrieve with one query per turn and score it against the turn's positives."""
    if len(turns) != len(queries):
        raise ValueError(f"{len(turns)} turns but {len(queries)} queries")
    results: list[TurnResult] = []
    for start in range(0, len(turns), batch_size):
        chunk_turns = turns[start : start + batch_size]
        chunk_queries = list(queries[start : start + batch_size])
        runs = retriever.search(chunk_queries, k=k)
        rankings = {t.id: [hit.passage_id for hit in hits] for t, hits in zip(chunk_turns, runs, strict=True)}
        metrics = per_query_metrics(rankings, {t.id: list(t.positives) for t in chunk_turns})
        for turn, query, hits in zip(chunk_turns, chunk_queries, runs, strict=True):
            results.append(
                TurnResult(
                    turn_id=turn.id,
                    query=query,
                    best_rank=best_gold_rank(hits, turn.positives),
                    top_ids=rankings[turn.id],
                    metrics=metrics.get(turn.id, {}),
                )
            )
    return results


def summarize(results: Sequence[TurnResult]) -> dict[str, float]:
    """Mean metrics over the turns that have gold passages, plus `n`."""
    return aggregate_metrics({r.turn_id: r.metrics for r in results if r.metrics})


def format_table(rows: dict[str, dict[str, float]]) -> str:
    """A plain-text table: one row per named result, metrics in percent.

    `format_ok` and `copy_rate` get a column when some row has them ("-" where a row has not)."""
    names = [*METRIC_NAMES, *(n for n in SHARE_NAMES if any(n in metrics for metrics in rows.values()))]
    width = max([len(label) for label in rows] + [8])
    header = f"{'':<{width}}  " + "  ".join(f"{n:>10}" for n in names) + f"  {'n':>6}"
    lines = [header]
    for label, metrics in rows.items():
        values = "  ".join(f"{100 * metrics[n]:>10.1f}" if n in metrics else f"{'-':>10}" for n in names)
        lines.append(f"{label:<{width}}  {values}  {int(metrics['n']):>6}")
    return "\n".join(lines)
