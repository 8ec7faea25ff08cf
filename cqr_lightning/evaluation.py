"""Score rewrites (one per turn), searched as a `SearchPlan` says: per-turn ranks and metrics, and their means."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from cqr_lightning.metrics import METRIC_NAMES, aggregate_metrics, per_query_metrics
from cqr_lightning.records import Turn
from cqr_lightning.retrieval.base import Retriever, SearchHit, best_gold_rank
from cqr_lightning.search import SearchPlan, TurnRewrites, as_tuple

SHARE_NAMES = ("format_ok", "copy_rate")  # shares of turns that some results carry besides the metrics


@dataclass
class TurnResult:
    turn_id: str
    query: str  # what was searched (fused queries joined by ' || ')
    best_rank: int | None
    top_ids: list[str]
    metrics: dict[str, float]
    rewrite: str | None = None  # the rewriter's output (None: it gave none and the question was searched)
    as_asked: bool = False  # searched with the question as asked (first turn, copy or no rewrite)
    response: str | None = None
    format_ok: bool | None = None
    top_scores: list[float] = field(default_factory=list)  # the retriever's (or fused) scores of top_ids
    samples: list[str] = field(default_factory=list)  # further sampled rewrites searched beside `rewrite`

    def to_json(self) -> dict:
        return {
            "id": self.turn_id,
            "query": self.query,
            "rewrite": self.rewrite,
            "as_asked": self.as_asked,
            "best_rank": self.best_rank,
            "top10": self.top_ids[:10],
            **({"samples": self.samples} if self.samples else {}),
            **({"response": self.response, "format_ok": self.format_ok} if self.response is not None else {}),
            **self.metrics,
        }


def check_unique_ids(turns: Sequence[Turn]) -> None:
    """Metrics are keyed by turn id: a repeated id would merge two turns' scores (ValueError naming it)."""
    seen: set[str] = set()
    for turn in turns:
        if turn.id in seen:
            raise ValueError(f"turn id '{turn.id}' appears more than once in the evaluated turns: ids must be unique")
        seen.add(turn.id)


def results_from_rankings(
    turns: Sequence[Turn], rewrites: Sequence[TurnRewrites], rankings: Sequence[Sequence[SearchHit]], plan: SearchPlan
) -> list[TurnResult]:
    """Per-turn results of rankings already searched for `rewrites` under `plan`."""
    check_unique_ids(turns)
    ids = {t.id: [hit.passage_id for hit in hits] for t, hits in zip(turns, rankings, strict=True)}
    metrics = per_query_metrics(ids, {t.id: list(t.positives) for t in turns})
    return [
        TurnResult(
            turn_id=turn.id,
            query=plan.describe(turn, rewrite),
            best_rank=best_gold_rank(hits, turn.positives),
            top_ids=ids[turn.id],
            top_scores=[hit.score for hit in hits],
            metrics=metrics.get(turn.id, {}),
            rewrite=(as_tuple(rewrite) or (None,))[0],
            samples=list(as_tuple(rewrite)[1:]),
            as_asked=plan.as_asked(turn, rewrite),
        )
        for turn, rewrite, hits in zip(turns, rewrites, rankings, strict=True)
    ]


def score_turns(
    turns: Sequence[Turn],
    rewrites: Sequence[TurnRewrites],
    retriever: Retriever,
    plan: SearchPlan | None = None,
    k: int = 100,
    batch_size: int = 256,
) -> list[TurnResult]:
    """Search every turn with its rewrite (or rewrites) as the plan says and score the ranking against the turn's
    positives."""
    from cqr_lightning.search import search_turns

    plan = plan or SearchPlan()
    check_unique_ids(turns)
    if len(turns) != len(rewrites):
        raise ValueError(f"{len(turns)} turns but {len(rewrites)} rewrites")
    results: list[TurnResult] = []
    for start in range(0, len(turns), batch_size):
        chunk_turns, chunk_rewrites = turns[start : start + batch_size], rewrites[start : start + batch_size]
        rankings = search_turns(retriever, plan, chunk_turns, chunk_rewrites, k=k)
        results.extend(results_from_rankings(chunk_turns, chunk_rewrites, rankings, plan))
    return results


def summarize(results: Sequence[TurnResult]) -> dict[str, float]:
    """Mean metrics over the turns that have gold passages, plus `n`."""
    return aggregate_metrics({r.turn_id: r.metrics for r in results if r.metrics})


def turn_groups(turns: Sequence[Turn]) -> dict[str, list[str]]:
    """Turn ids by group: first turns (no history) and later turns, then each `source` when there are several."""
    groups: dict[str, list[str]] = {
        "first turns": [t.id for t in turns if not t.history],
        "later turns": [t.id for t in turns if t.history],
    }
    sources = sorted({t.source for t in turns if t.source})
    if len(sources) > 1:
        for source in sources:
            groups[f"source {source}"] = [t.id for t in turns if t.source == source]
    return {name: ids for name, ids in groups.items() if ids}


def summarize_groups(turns: Sequence[Turn], results: Sequence[TurnResult]) -> dict[str, dict[str, float]]:
    """`summarize` within each of `turn_groups` (groups without judged turns left out), with each group's share of
    turns searched as asked (`copy_rate`)."""
    by_id = {r.turn_id: r for r in results}
    table: dict[str, dict[str, float]] = {}
    for name, ids in turn_groups(turns).items():
        members = [by_id[i] for i in ids if i in by_id]
        if any(r.metrics for r in members):
            table[name] = {**summarize(members), "copy_rate": sum(r.as_asked for r in members) / len(members)}
    return table


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
