"""TREC run and qrels lines: trec_eval must read back the ranking exactly as it was scored."""

from __future__ import annotations

import pytest

from cqr_lightning.records import Turn
from cqr_lightning.trec import qrels_lines, run_lines, run_scores


def test_ties_and_out_of_order_scores_are_nudged_below_the_previous_one_and_repeats_dropped():
    ranked = run_scores(["a", "b", "a", "c", "d"], [2.0, 2.0, 9.0, 3.0, 0.5])
    assert [pid for pid, _ in ranked] == ["a", "b", "c", "d"]
    scores = [score for _, score in ranked]
    assert scores[0] == 2.0 and scores[3] == 0.5  # kept: each clearly below the one before
    assert scores[1] == 2.0 - 2e-5 and scores[2] == pytest.approx(2.0 - 4e-5, abs=1e-9)  # a tie and c's 3.0 lowered


@pytest.mark.parametrize("order", [["a", "b"], ["b", "a"]])
def test_trec_eval_ranks_tied_passages_in_the_order_written(order):
    import pytrec_eval

    run: dict[str, dict[str, float]] = {}
    for line in run_lines([("q1", order, [1.0, 1.0])], tag="t"):
        qid, _, docid, _, score, _ = line.split()
        run.setdefault(qid, {})[docid] = float(score)
    qid, _, docid, relevance = next(iter(qrels_lines([Turn("q1", (), "?", positives=(order[1],))]))).split()
    qrels = {qid: {docid: int(relevance)}}
    result = pytrec_eval.RelevanceEvaluator(qrels, {"recip_rank"}).evaluate(run)
    assert result["q1"]["recip_rank"] == 0.5  # whatever trec_eval's tie-breaking on passage ids would say


def test_lines_are_trec_formatted_and_ids_with_spaces_refused():
    lines = list(run_lines([("q1", ["p1", "p2"], [3.5, 1.25])], tag="cqr_raw_rewrite"))
    assert lines == ["q1 Q0 p1 1 3.5 cqr_raw_rewrite\n", "q1 Q0 p2 2 1.25 cqr_raw_rewrite\n"]
    turns = [Turn("q1", (), "?", positives=("p1", "p1", "p3")), Turn("q2", (), "?", positives=())]
    assert list(qrels_lines(turns)) == ["q1 0 p1 1\n", "q1 0 p3 1\n"]
    with pytest.raises(ValueError, match="one word"):
        list(run_lines([("q 1", ["p1"], [1.0])], tag="t"))
    with pytest.raises(ValueError, match="one word"):
        list(run_lines([("q1", ["p1"], [1.0])], tag="two words"))
