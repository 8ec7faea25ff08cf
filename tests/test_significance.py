"""The paired randomization test that says whether one rewriter's gain over another is more than chance."""

from __future__ import annotations

import gzip
import itertools
import json

import numpy as np
import pytest

from cqr_lightning.errors import DataError
from cqr_lightning.evaluation import format_table
from cqr_lightning.significance import compare_files, main, paired_randomization_test


def exact_p_value(baseline, candidate) -> float:
    """Every sign assignment enumerated (feasible for a handful of turns)."""
    differences = np.asarray(candidate, dtype=float) - np.asarray(baseline, dtype=float)
    observed = abs(differences.mean())
    means = [
        abs(np.dot(signs, differences)) / len(differences)
        for signs in itertools.product((-1, 1), repeat=len(differences))
    ]
    return sum(m >= observed - 1e-12 for m in means) / len(means)


def test_identical_scores_give_no_difference_and_p_one():
    scores = [1.0, 0.5, 0.0, 1 / 3, 1.0]
    result = paired_randomization_test(scores, scores, samples=500)
    assert result.mean_difference == 0.0 and result.p_value == 1.0
    assert (result.better, result.worse, result.equal) == (0, 0, 5)


def test_p_value_matches_the_exact_enumeration():
    baseline = [0.0, 0.5, 1.0, 0.0, 1 / 3, 0.0, 1.0, 0.5]
    candidate = [1.0, 0.5, 1.0, 0.5, 1.0, 0.0, 0.5, 1.0]
    result = paired_randomization_test(baseline, candidate, samples=100_000, seed=3)
    assert result.mean_difference == pytest.approx(np.mean(candidate) - np.mean(baseline))
    assert (result.better, result.worse, result.equal) == (4, 1, 3)
    assert result.p_value == pytest.approx(exact_p_value(baseline, candidate), abs=0.01)


def test_a_consistent_gain_on_many_turns_is_significant_and_a_mixed_one_is_not():
    baseline = [0.0] * 40
    assert paired_randomization_test(baseline, [1.0] * 40, samples=2000).p_value < 0.001
    mixed = [1.0, -1.0] * 20
    assert paired_randomization_test(baseline, mixed, samples=2000).p_value > 0.5


def write_rewrites(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_compare_files_pairs_turns_by_id_and_skips_turns_without_gold(tmp_path, capsys):
    baseline = write_rewrites(
        tmp_path / "raw.jsonl",
        [{"id": "a", "mrr@3": 0.0}, {"id": "b", "mrr@3": 1.0}, {"id": "c", "best_rank": None}],
    )
    candidate = write_rewrites(
        tmp_path / "model.jsonl",
        [{"id": "b", "mrr@3": 1.0}, {"id": "c", "best_rank": None}, {"id": "a", "mrr@3": 0.5}],
    )
    result = compare_files(baseline, candidate, samples=100)
    assert result.mean_difference == pytest.approx(0.25)
    assert (result.better, result.worse, result.equal) == (1, 0, 1)
    main([str(baseline), str(candidate), "--samples", "100"])
    assert "+25.00 mrr@3 points over 2 turns (better on 1, worse on 0, equal on 1)" in capsys.readouterr().out


def test_evaluations_of_different_turns_are_refused_naming_the_file(tmp_path):
    baseline = write_rewrites(tmp_path / "raw.jsonl", [{"id": "a", "mrr@3": 0.0}, {"id": "b", "mrr@3": 1.0}])
    candidate = write_rewrites(tmp_path / "other.jsonl", [{"id": "a", "mrr@3": 0.0}, {"id": "z", "mrr@3": 1.0}])
    with pytest.raises(DataError, match=r"other\.jsonl.*same turns.*'b'"):
        compare_files(baseline, candidate)


def test_several_candidate_runs_are_averaged_per_turn_and_each_must_cover_the_same_turns(tmp_path, capsys):
    baseline = write_rewrites(tmp_path / "raw.jsonl", [{"id": "a", "mrr@3": 0.0}, {"id": "b", "mrr@3": 0.5}])
    seed0 = write_rewrites(tmp_path / "seed0.jsonl", [{"id": "a", "mrr@3": 1.0}, {"id": "b", "mrr@3": 0.0}])
    seed1 = write_rewrites(tmp_path / "seed1.jsonl", [{"id": "b", "mrr@3": 1.0}, {"id": "a", "mrr@3": 0.5}])
    result = compare_files(baseline, [seed0, seed1], samples=100)
    # per turn: a (1.0 + 0.5) / 2 - 0.0 = 0.75, b (0.0 + 1.0) / 2 - 0.5 = 0.0
    assert result.mean_difference == pytest.approx(0.375)
    assert (result.better, result.worse, result.equal) == (1, 0, 1)
    main([str(baseline), str(seed0), str(seed1), "--samples", "100"])
    assert "+37.50 mrr@3 points over 2 turns" in capsys.readouterr().out
    partial = write_rewrites(tmp_path / "seed2.jsonl", [{"id": "a", "mrr@3": 1.0}])
    with pytest.raises(DataError, match=r"seed2\.jsonl.*same turns.*'b'"):
        compare_files(baseline, [seed0, partial])


def test_a_malformed_line_names_the_file_and_line(tmp_path):
    baseline = write_rewrites(tmp_path / "raw.jsonl", [{"id": "a", "mrr@3": 0.0}])
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"id": "a", "mrr@3": 1.0}\n{"id": "b", \n')
    with pytest.raises(DataError, match=r"broken\.jsonl:2: malformed JSON"):
        compare_files(baseline, broken)


def test_gzipped_evaluations_compare_like_plain_ones_and_a_damaged_one_names_the_file(tmp_path):
    rows = [{"id": "a", "mrr@3": 0.0}, {"id": "b", "mrr@3": 1.0}, {"id": "c", "mrr@3": 0.5}]
    baseline = write_rewrites(tmp_path / "raw.jsonl", rows)
    candidate = write_rewrites(tmp_path / "model.jsonl", [{**row, "mrr@3": 1.0} for row in rows])
    packed = tmp_path / "model.jsonl.gz"
    packed.write_bytes(gzip.compress(candidate.read_bytes()))
    plain, zipped = compare_files(baseline, candidate, samples=100), compare_files(baseline, packed, samples=100)
    assert zipped.mean_difference == plain.mean_difference == pytest.approx(0.5)
    truncated = tmp_path / "cut.jsonl.gz"
    truncated.write_bytes(packed.read_bytes()[:-12])
    with pytest.raises(DataError, match=r"cut\.jsonl\.gz: not a readable gzip file .* after line [0-3];"):
        compare_files(baseline, truncated)
    not_gzip = tmp_path / "plain.jsonl.gz"
    not_gzip.write_bytes(candidate.read_bytes())
    with pytest.raises(DataError, match=r"plain\.jsonl\.gz: not a readable gzip file .* after line 0"):
        compare_files(baseline, not_gzip)


def test_the_table_shows_format_and_copy_shares_where_a_row_has_them():
    rows = {
        "raw question": {
            "mrr@3": 0.5,
            "mrr": 0.5,
            "ndcg@3": 0.5,
            "recall@10": 1.0,
            "recall@100": 1.0,
            "n": 2,
            "copy_rate": 1.0,
        },  # fmt: skip
        "model": {
            "mrr@3": 1.0,
            "mrr": 1.0,
            "ndcg@3": 1.0,
            "recall@10": 1.0,
            "recall@100": 1.0,
            "n": 2,
            "format_ok": 0.5,
            "copy_rate": 0.0,
        },  # fmt: skip
    }
    header, raw, model = format_table(rows).splitlines()
    assert header.split()[-3:] == ["format_ok", "copy_rate", "n"]
    assert raw.split()[-3:] == ["-", "100.0", "2"]
    assert model.split()[-3:] == ["50.0", "0.0", "2"]


def test_two_recipes_are_compared_with_both_sides_averaged_over_their_seeds(tmp_path, capsys):
    a0 = write_rewrites(tmp_path / "a0.jsonl", [{"id": "x", "mrr@3": 0.0}, {"id": "y", "mrr@3": 1.0}])
    a1 = write_rewrites(tmp_path / "a1.jsonl", [{"id": "y", "mrr@3": 0.0}, {"id": "x", "mrr@3": 1.0}])
    b0 = write_rewrites(tmp_path / "b0.jsonl", [{"id": "x", "mrr@3": 1.0}, {"id": "y", "mrr@3": 1.0}])
    # per turn: baseline x 0.5, y 0.5; candidate x 1.0, y 1.0
    result = compare_files([a0, a1], b0, samples=100)
    assert result.mean_difference == pytest.approx(0.5)
    assert (result.better, result.worse, result.equal) == (2, 0, 0)
    main([str(a0), str(b0), "--baseline-also", str(a1), "--samples", "100"])
    assert "+50.00 mrr@3 points over 2 turns (better on 2" in capsys.readouterr().out
    short = write_rewrites(tmp_path / "a2.jsonl", [{"id": "x", "mrr@3": 1.0}])
    with pytest.raises(DataError, match=r"a2\.jsonl.*same turns"):
        compare_files([a0, short], b0)


def test_turns_are_also_compared_within_first_turns_later_turns_and_each_source(tmp_path, capsys):
    from cqr_lightning.significance import compare_files_by_group

    turns = [  # c1 and c2 are conversations; x is judged nowhere (absent from the evaluations)
        {"id": "c1_1", "source": "s1", "history": [], "question": "q", "positives": ["p"]},
        {"id": "c1_2", "source": "s1", "history": [{"role": "user", "text": "q"}], "question": "q", "positives": ["p"]},
        {"id": "c2_1", "source": "s2", "history": [], "question": "q", "positives": ["p"]},
        {"id": "c2_2", "source": "s2", "history": [{"role": "user", "text": "q"}], "question": "q", "positives": ["p"]},
        {"id": "x", "source": "s2", "history": [], "question": "q", "positives": ["p"]},
    ]
    turn_file = write_rewrites(tmp_path / "turns.jsonl", turns)
    raw = {"c1_1": 1.0, "c1_2": 0.0, "c2_1": 0.5, "c2_2": 0.0}
    model = {"c1_1": 1.0, "c1_2": 1.0, "c2_1": 0.5, "c2_2": 0.5}
    baseline = write_rewrites(tmp_path / "raw.jsonl", [{"id": k, "mrr@3": v} for k, v in raw.items()])
    candidate = write_rewrites(tmp_path / "model.jsonl", [{"id": k, "mrr@3": v} for k, v in model.items()])
    groups = {"first": ["c1_1", "c2_1", "x"], "later": ["c1_2", "c2_2"], "none": ["x"]}
    by_group = compare_files_by_group(baseline, candidate, groups, samples=100)
    assert list(by_group) == ["first", "later"], "a group the evaluations do not score is left out"
    assert by_group["first"].mean_difference == 0.0 and by_group["first"].equal == 2
    assert by_group["later"].mean_difference == pytest.approx(0.75) and by_group["later"].better == 2
    main([str(baseline), str(candidate), "--samples", "100", "--turns", str(turn_file)])
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in lines[1:]] == [
        "  first turns",
        "  later turns",
        "  source s1",
        "  source s2",
    ]
    assert "+50.00 mrr@3 points over 2 turns" in lines[3] and "+25.00 mrr@3 points over 2 turns" in lines[4]


def exact_conversation_p_value(baseline, candidate, conversations) -> float:
    """Every sign assignment of whole conversations enumerated."""
    differences = np.asarray(candidate, dtype=float) - np.asarray(baseline, dtype=float)
    labels = sorted(set(conversations))
    sums = np.array([sum(d for d, c in zip(differences, conversations, strict=True) if c == label) for label in labels])
    observed = abs(differences.mean())
    means = [abs(np.dot(signs, sums)) / len(differences) for signs in itertools.product((-1, 1), repeat=len(labels))]
    return sum(m >= observed - 1e-12 for m in means) / len(means)


def test_flipping_whole_conversations_matches_the_exact_enumeration_over_conversations():
    baseline = [0.0, 0.5, 1.0, 0.0, 1 / 3, 0.0, 1.0, 0.5, 0.0]
    candidate = [1.0, 0.5, 1.0, 0.5, 1.0, 0.0, 0.5, 1.0, 1.0]
    conversations = ["a", "a", "b", "c", "c", "c", "d", "e", "f"]
    result = paired_randomization_test(baseline, candidate, conversations=conversations, samples=100_000, seed=2)
    assert result.mean_difference == pytest.approx(np.mean(candidate) - np.mean(baseline))
    assert result.conversations == 6 and "per conversation, 6" in result.describe("mrr@3")
    assert result.p_value == pytest.approx(exact_conversation_p_value(baseline, candidate, conversations), abs=0.01)
    assert result.p_value != pytest.approx(exact_p_value(baseline, candidate), abs=0.01), "a different test"


def test_a_gain_all_in_one_conversation_is_significant_per_turn_but_not_per_conversation():
    # twelve turns of one conversation gain a full point; five other conversations, one turn each, change nothing
    baseline = [0.0] * 12 + [0.5] * 5
    candidate = [1.0] * 12 + [0.5] * 5
    conversations = ["long"] * 12 + ["c1", "c2", "c3", "c4", "c5"]
    per_turn = paired_randomization_test(baseline, candidate, samples=20_000)
    per_conversation = paired_randomization_test(baseline, candidate, conversations=conversations, samples=20_000)
    assert per_turn.p_value < 0.001 and per_turn.conversations is None
    assert per_conversation.p_value == 1.0, "flipping the one conversation that moved gives the same |mean|"
    assert per_conversation.mean_difference == per_turn.mean_difference
    with pytest.raises(ValueError, match="conversation labels"):
        paired_randomization_test(baseline, candidate, conversations=conversations[:-1])


def test_the_command_flips_per_conversation_read_from_the_turn_file(tmp_path, capsys):
    after_a = [{"role": "user", "text": "opening a"}]
    turns = [  # two conversations, known by their first user message (as the held-out split knows them)
        {"id": "t1", "source": "s", "history": [], "question": "Opening A", "positives": ["p"]},
        {"id": "t2", "source": "s", "history": after_a, "question": "q", "positives": ["p"]},
        {"id": "t3", "source": "s", "history": [], "question": "Opening B", "positives": ["p"]},
    ]
    turn_file = write_rewrites(tmp_path / "turns.jsonl", turns)
    baseline = write_rewrites(tmp_path / "raw.jsonl", [{"id": t, "mrr@3": 0.0} for t in ("t1", "t2", "t3")])
    candidate = write_rewrites(tmp_path / "m.jsonl", [{"id": t, "mrr@3": 1.0} for t in ("t1", "t2", "t3")])
    result = main([str(baseline), str(candidate), "--turns", str(turn_file), "--by-conversation", "--samples", "2000"])
    assert result.conversations == 2
    assert result.p_value == pytest.approx(0.5, abs=0.03), "2 conversations: 2 of 4 sign assignments as extreme"
    out = capsys.readouterr().out.splitlines()
    assert "per conversation, 2)" in out[0] and "later turns" in out[2] and "per conversation, 1)" in out[2]
    with pytest.raises(SystemExit):
        main([str(baseline), str(candidate), "--by-conversation"])
    assert "--turns" in capsys.readouterr().err
    short = write_rewrites(tmp_path / "short.jsonl", turns[:2])
    with pytest.raises(DataError, match=r"short\.jsonl.*1 of the 3 evaluated turns.*'t3'"):
        main([str(baseline), str(candidate), "--turns", str(short), "--by-conversation"])
