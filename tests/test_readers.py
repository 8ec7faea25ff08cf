"""Readers on fixture files in each supported format, and on malformed input."""

from __future__ import annotations

import json

import pytest

from cqr_lightning.errors import DataError
from cqr_lightning.readers import (
    iter_json_array,
    read_jsonl_turns,
    read_qrecc_turns,
    read_topiocqa_turns,
    read_trec_qrels,
)
from cqr_lightning.records import Utterance


def write_lines(path, rows):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


JSONL_TURN = {
    "id": "c1_2",
    "source": "demo",
    "history": [{"role": "user", "text": "Who wrote Dune?"}, {"role": "assistant", "text": "Frank Herbert."}],
    "question": "When was it published?",
    "positives": ["p1", "p2"],
    "rewrite": "When was Dune by Frank Herbert published?",
}


def test_jsonl_reader_builds_turns(tmp_path):
    path = write_lines(tmp_path / "dev.jsonl", [JSONL_TURN, {**JSONL_TURN, "id": "c1_3", "rewrite": None}])
    turns = list(read_jsonl_turns(path, known_ids={"p1", "p2"}))
    assert [t.id for t in turns] == ["c1_2", "c1_3"]
    assert turns[0].history == (Utterance("user", "Who wrote Dune?"), Utterance("assistant", "Frank Herbert."))
    assert turns[0].positives == ("p1", "p2")
    assert turns[1].rewrite is None


@pytest.mark.parametrize(
    ("bad_line", "message"),
    [
        ('{"id": "x", "history": [', "malformed JSON"),
        (json.dumps({k: v for k, v in JSONL_TURN.items() if k != "question"}), "missing field 'question'"),
        (json.dumps({**JSONL_TURN, "question": "  "}), "question is empty"),
        (json.dumps({**JSONL_TURN, "history": [{"role": "bot", "text": "hi"}]}), "history[0]"),
        (json.dumps({**JSONL_TURN, "positives": "p1"}), "field 'positives' should be list"),
        (json.dumps({**JSONL_TURN, "positives": ["p9"]}), "'p9' is not in the corpus"),
    ],
)
def test_jsonl_reader_names_file_and_line_of_bad_input(tmp_path, bad_line, message):
    path = write_lines(tmp_path / "train.jsonl", [JSONL_TURN, "", bad_line])
    with pytest.raises(DataError) as err:
        list(read_jsonl_turns(path, known_ids={"p1", "p2"}))
    assert f"{path}:3:" in str(err.value)
    assert message in str(err.value)


def test_missing_file_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="file not found"):
        list(read_jsonl_turns(tmp_path / "nope.jsonl"))


TOPIOCQA = [
    {"Context": [], "Conversation_no": 1, "Turn_no": 1, "Question": "who wrote dune", "Answer": "Frank Herbert",
     "Topic": "Dune", "Gold_passage": {"id": "101", "title": "Dune", "text": "..."}},
    {"Context": ["who wrote dune", "Frank Herbert"], "Conversation_no": 1, "Turn_no": 2,
     "Question": "when was it published?", "Answer": "1965", "Topic": "Dune",
     "Gold_passage": {"id": 102, "title": "Dune", "text": "..."}},
]  # fmt: skip


def test_topiocqa_official_json(tmp_path):
    path = tmp_path / "topiocqa_dev.json"
    path.write_text(json.dumps(TOPIOCQA, indent=4))
    turns = list(read_topiocqa_turns(path, known_ids={"101", "102"}))
    assert [t.id for t in turns] == ["1_1", "1_2"]
    assert turns[1].history == (Utterance("user", "who wrote dune"), Utterance("assistant", "Frank Herbert"))
    assert turns[1].positives == ("102",)
    assert turns[1].answer == "1965"


def test_topiocqa_without_gold_passage_is_allowed_unless_required(tmp_path):
    path = tmp_path / "early.json"
    rows = [{k: v for k, v in row.items() if k != "Gold_passage"} for row in TOPIOCQA]
    path.write_text(json.dumps(rows, indent=4))
    assert [t.positives for t in read_topiocqa_turns(path)] == [(), ()]
    with pytest.raises(DataError, match=r"early.json:2: turn 1_1 has no 'Gold_passage'"):
        list(read_topiocqa_turns(path, require_gold=True))


def test_json_array_stream_reports_line_of_broken_record(tmp_path):
    path = tmp_path / "broken.json"
    text = json.dumps(TOPIOCQA, indent=4)
    broken = text.replace('"Turn_no": 2,', '"Turn_no": 2 "x": 1,')
    path.write_text(broken)
    start_line = broken[: broken.index('"Turn_no": 2')].count("\n") + 1
    with pytest.raises(DataError) as err:
        list(iter_json_array(path))
    assert f"broken.json:{start_line}:" in str(err.value)


def test_json_array_stream_crosses_chunk_boundaries(tmp_path, monkeypatch):
    import cqr_lightning.readers as readers

    monkeypatch.setattr(readers, "_CHUNK_CHARS", 7)
    path = tmp_path / "many.json"
    rows = [{**TOPIOCQA[0], "Turn_no": i} for i in range(1, 30)]
    path.write_text(json.dumps(rows, indent=2))
    parsed = list(iter_json_array(path))
    assert [obj["Turn_no"] for _, obj in parsed] == list(range(1, 30))
    assert parsed[1][0] == json.dumps(rows, indent=2).split("\n").index("  {", 2) + 1


def test_qrecc_json_with_qrels(tmp_path):
    qrecc = [
        {"Context": [], "Question": "What is QReCC?", "Rewrite": "What is QReCC?", "Answer": "A dataset.",
         "Answer_URL": "u", "Conversation_no": 7, "Turn_no": 1, "Conversation_source": "quac"},
        {"Context": ["What is QReCC?", "A dataset."], "Question": "Who made it?", "Rewrite": "Who made QReCC?",
         "Answer": "Apple.", "Answer_URL": "u", "Conversation_no": 7, "Turn_no": 2, "Conversation_source": "quac"},
    ]  # fmt: skip
    data = tmp_path / "qrecc_test.json"
    data.write_text(json.dumps(qrecc))
    qrels = tmp_path / "qrels.txt"
    qrels.write_text("quac_7_2 0 doc-a 1\nquac_7_2 0 doc-b 0\nquac_7_2 Q0 doc-c 2\n")
    turns = list(read_qrecc_turns(data, qrels))
    assert [t.id for t in turns] == ["quac_7_2"]  # turn 1 has no qrels: skipped
    assert turns[0].positives == ("doc-a", "doc-c")
    assert turns[0].rewrite == "Who made QReCC?"


def test_qrels_bad_line(tmp_path):
    qrels = tmp_path / "qrels.txt"
    qrels.write_text("q1 0 d1 1\nq2 0 d2\n")
    with pytest.raises(DataError, match=r"qrels.txt:2: expected 'qid iteration docid relevance'"):
        read_trec_qrels(qrels)
