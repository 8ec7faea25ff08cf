"""Ranking metrics with trec_eval semantics (through pytrec_eval).

`mrr@3` is trec_eval's reciprocal rank over the run cut to its top 3; `mrr` is the full reciprocal
rank over the top 100 (what the reference evaluation script calls MRR); `ndcg@3` is `ndcg_cut.3`;
`recall@10` / `recall@100` are `recall.10` / `recall.100`.  Runs are handed to trec_eval with
scores derived from our ranks, so its score-then-docid tie-breaking cannot reorder a ranking.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

METRIC_NAMES = ("mrr@3", "mrr", "ndcg@3", "recall@10", "recall@100")
_TREC_MEASURES = {"recip_rank", "ndcg_cut.3", "recall.10", "recall.100"}


def _rank_scores(ranking: Sequence[str]) -> dict[str, float]:
    scores: dict[str, float] = {}
    for rank, passage_id in enumerate(ranking):
        scores.setdefault(passage_id, float(len(ranking) - rank))
    return scores


def per_query_metrics(
    rankings: Mapping[str, Sequence[str]], qrels: Mapping[str, Mapping[str, int] | Sequence[str]]
) -> dict[str, dict[str, float]]:
    """Metrics of every query that has at least one relevant passage.

    rankings: query id -> passage ids, best first.  qrels: query id -> {passage id: grade} or a list of
    relevant ids (grade 1).  A query with no retrieved passage scores 0 everywhere.
    """
    import pytrec_eval  # here, not at module level: the GPU machine trains without it

    judged = {qid: (dict(rel) if isinstance(rel, Mapping) else {pid: 1 for pid in rel}) for qid, rel in qrels.items()}
    judged = {qid: {pid: int(g) for pid, g in rel.items()} for qid, rel in judged.items() if any(rel.values())}
    full_run = {qid: _rank_scores(rankings.get(qid, ())) for qid in judged}
    top3_run = {qid: _rank_scores(list(rankings.get(qid, ()))[:3]) for qid in judged}
    full = pytrec_eval.RelevanceEvaluator(judged, _TREC_MEASURES).evaluate(full_run)
    top3 = pytrec_eval.RelevanceEvaluator(judged, {"recip_rank"}).evaluate(top3_run)
    results = {}
    for qid in judged:
        scores = full.get(qid, {})
        results[qid] = {
            "mrr@3": top3.get(qid, {}).get("recip_rank", 0.0),
            "mrr": scores.get("recip_rank", 0.0),
            "ndcg@3": scores.get("ndcg_cut_3", 0.0),
            "recall@10": scores.get("recall_10", 0.0),
            "recall@100": scores.get("recall_100", 0.0),
        }
    return results


def aggregate_metrics(per_query: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """Mean of each metric over queries, plus `n`, the number of queries."""
    n = len(per_query)
    means = {name: (sum(m[name] for m in per_query.values()) / n if n else 0.0) for name in METRIC_NAMES}
    return {**means, "n": n}
