"""Metrics against hand-computed values (trec_eval semantics)."""

from __future__ import annotations

import math

import pytest

from cqr_lightning.metrics import aggregate_metrics, per_query_metrics


def test_single_relevant_passage_at_rank_two():
    m = per_query_metrics({"q": ["a", "b", "c"]}, {"q": ["b"]})["q"]
    assert m["mrr@3"] == pytest.approx(0.5)
    assert m["mrr"] == pytest.approx(0.5)
    assert m["ndcg@3"] == pytest.approx(1 / math.log2(3))
    assert m["recall@10"] == 1.0 and m["recall@100"] == 1.0


def test_relevant_below_top_three_counts_for_full_mrr_only():
    ranking = [f"d{i}" for i in range(20)]
    m = per_query_metrics({"q": ranking}, {"q": ["d4", "d15"]})["q"]
    assert m["mrr@3"] == 0.0
    assert m["mrr"] == pytest.approx(1 / 5)
    assert m["ndcg@3"] == 0.0
    assert m["recall@10"] == pytest.approx(0.5)
    assert m["recall@100"] == pytest.approx(1.0)


def test_two_relevant_ndcg_uses_ideal_ranking():
    m = per_query_metrics({"q": ["x", "a", "b"]}, {"q": {"a": 1, "b": 1}})["q"]
    dcg = 1 / math.log2(3) + 1 / math.log2(4)
    idcg = 1 + 1 / math.log2(3)
    assert m["ndcg@3"] == pytest.approx(dcg / idcg)


def test_rank_order_is_kept_even_where_trec_eval_would_break_ties_by_docid():
    # trec_eval sorts equal scores by docid; our ranks must win: "z" first, then "a".
    m = per_query_metrics({"q": ["z", "a"]}, {"q": ["a"]})["q"]
    assert m["mrr@3"] == pytest.approx(0.5)


def test_query_without_results_scores_zero_and_unjudged_query_is_dropped():
    per_query = per_query_metrics({"q1": []}, {"q1": ["a"], "q2": []})
    assert set(per_query) == {"q1"}
    assert all(v == 0.0 for v in per_query["q1"].values())


def test_aggregate_is_the_mean_with_count():
    per_query = per_query_metrics({"q1": ["a"], "q2": ["x", "y", "b"]}, {"q1": ["a"], "q2": ["b"]})
    agg = aggregate_metrics(per_query)
    assert agg["n"] == 2
    assert agg["mrr@3"] == pytest.approx((1 + 1 / 3) / 2)
