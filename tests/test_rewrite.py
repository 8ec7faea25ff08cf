"""`python -m cqr_lightning.rewrite`: turns without gold passages in, one rewrite per line out."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from cqr_lightning.errors import DataError
from cqr_lightning.readers import read_jsonl_turns
from cqr_lightning.rewrite import read_input_turns, rewrite_rows
from cqr_lightning.rewriters import Rewrite
from cqr_lightning.search import SearchPlan

ROOT = Path(__file__).resolve().parent.parent


def unjudged_turns(fixture_data_dir: Path, folder: Path) -> Path:
    """The fixture's dev turns without gold passages: `positives` dropped, or empty on the last turn."""
    rows = [json.loads(line) for line in (fixture_data_dir / "dev.jsonl").read_text().splitlines()]
    rows = [{k: v for k, v in row.items() if k != "positives"} for row in rows[:-1]] + [{**rows[-1], "positives": []}]
    path = folder / "turns.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_turns_to_rewrite_may_lack_positives_but_training_and_evaluation_readers_still_need_them(
    fixture_data_dir, tmp_path
):
    path = unjudged_turns(fixture_data_dir, tmp_path)
    turns = read_input_turns(path)
    assert [t.positives for t in turns] == [()] * 4 and turns[1].history
    with pytest.raises(DataError, match=f"{path}:1: missing field 'positives'"):
        list(read_jsonl_turns(path))
    repeated = tmp_path / "repeated.jsonl"
    repeated.write_text(path.read_text().splitlines(keepends=True)[0] * 2)
    with pytest.raises(DataError, match="turn id 'bee_1' appears more than once"):
        read_input_turns(repeated)


def test_rows_hold_the_rewrite_and_what_the_plan_would_search(fixture_data_dir, tmp_path):
    first, second = read_input_turns(unjudged_turns(fixture_data_dir, tmp_path))[:2]
    rewrites = [Rewrite("bees in colonies", "<rewrite> bees in colonies </rewrite>", True), Rewrite("bee dance food")]
    rows = list(rewrite_rows([first, second], rewrites, SearchPlan(query_mode="question_rewrite")))
    assert rows[0] == {
        "id": "bee_1",
        "question": "How do honey bees live?",
        "rewrite": "bees in colonies",
        "query": "How do honey bees live?",  # a first turn is searched as asked
        "response": "<rewrite> bees in colonies </rewrite>",
        "format_ok": True,
    }
    assert rows[1] == {
        "id": "bee_2",
        "question": "How do they share where food is?",
        "rewrite": "bee dance food",
        "query": "How do they share where food is? bee dance food",
    }
    fused = list(rewrite_rows([second], rewrites[1:], SearchPlan(query_mode="fusion")))
    assert fused[0]["query"] == "How do they share where food is? || bee dance food"
    sampled = Rewrite("bee dance food", samples=("waggle dance", "How do they share where food is"))
    [row] = rewrite_rows([second], [sampled], SearchPlan(query_mode="question_rewrite"))
    assert row["samples"] == ["waggle dance", "How do they share where food is"]
    q = second.question
    assert row["query"] == f"{q} bee dance food || {q} waggle dance || {q}"  # a copy searches the question
    assert row["bm25_query"] == f"{q} bee dance food {q} waggle dance {q}"  # their summed BM25 scores, as one query
    assert "bm25_query" not in fused[0], "no single BM25 query equals reciprocal rank fusion"


@pytest.mark.slow
def test_rewrite_command_uses_the_adapter_as_trained_and_its_output_can_be_scored(
    fixture_data_dir, tmp_path, saved_rewriter
):
    from cqr_lightning.rewriters import ModelRewriter

    adapter, policy, tokenizer = saved_rewriter
    turns_file = unjudged_turns(fixture_data_dir, tmp_path)
    output = tmp_path / "out" / "rewrites.jsonl"
    command = [
        sys.executable, "-m", "cqr_lightning.rewrite", f"model.adapter={adapter}", f"input={turns_file}",
        f"output={output}", f"output_dir={tmp_path / 'run'}", "rewriter.batch_size=3",
    ]  # fmt: skip
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "rewriting" in result.stderr and "4/4" in result.stderr  # the progress bar
    rows = [json.loads(line) for line in output.read_text().splitlines()]
    turns = read_input_turns(turns_file)
    assert [row["id"] for row in rows] == [t.id for t in turns]
    # the card's settings: tiny base model, rewrite_only prompt, 8 new tokens, question + rewrite searched
    expected = ModelRewriter(policy, tokenizer, max_prompt_length=200, max_new_tokens=8, response_format="rewrite_only")
    assert [(row["response"], row["rewrite"]) for row in rows] == [(r.response, r.query) for r in expected(turns)]
    plan = SearchPlan(query_mode="question_rewrite")
    for turn, row in zip(turns, rows, strict=True):
        assert row["query"] == plan.describe(turn, row["rewrite"])

    scored = tmp_path / "scored"
    command = [
        sys.executable, "-m", "cqr_lightning.evaluate", "data=jsonl", f"data.dir={fixture_data_dir}",
        "rewriter=file", f"rewriter.path={output}", "search.query_mode=question_rewrite", f"output_dir={scored}",
        "logger=none",
    ]  # fmt: skip
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    evaluated = [json.loads(line) for line in (scored / "rewrites.jsonl").read_text().splitlines()]
    assert [row["query"] for row in evaluated] == [row["query"] for row in rows]
