"""Property-based fuzzing of the readers: whatever bytes a file holds, the result is records or a DataError."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from cqr_lightning.errors import DataError
from cqr_lightning.readers import read_jsonl_turns, read_topiocqa_turns, read_trec_qrels
from cqr_lightning.records import Turn
from cqr_lightning.retrieval.corpus import Passage, read_corpus

FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

json_scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True), st.text(max_size=20))
json_values = st.recursive(
    json_scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)),
    max_leaves=12,
)
utterances = st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "assistant", "system", ""]), "text": st.one_of(st.text(max_size=30), json_values)}
)
# turns close to the format, so the field checks are reached and not only the JSON parser
turn_objects = st.fixed_dictionaries(
    {},
    optional={
        "id": st.one_of(st.text(max_size=10), st.integers(), json_values),
        "history": st.one_of(st.lists(utterances, max_size=3), json_values),
        "question": st.one_of(st.text(max_size=40), json_values),
        "positives": st.one_of(st.lists(st.one_of(st.text(max_size=5), st.integers()), max_size=3), json_values),
        "rewrite": st.one_of(st.none(), st.text(max_size=20), json_values),
        "answer": st.one_of(st.none(), st.text(max_size=20), json_values),
        "source": json_values,
    },
)


@st.composite
def file_bytes(draw, objects=turn_objects) -> bytes:
    """Raw bytes, near-valid JSON lines, or near-valid lines with some bytes changed, cut or inserted."""
    kind = draw(st.sampled_from(["raw", "lines", "mutated"]))
    if kind == "raw":
        return draw(st.binary(max_size=300))
    rows = draw(st.lists(st.one_of(objects, json_values), max_size=5))
    data = "".join(json.dumps(row, ensure_ascii=draw(st.booleans())) + "\n" for row in rows).encode()
    if kind == "mutated" and data:
        for _ in range(draw(st.integers(1, 4))):
            if not data:  # an earlier mutation cut the last byte
                break
            at = draw(st.integers(0, len(data) - 1))
            data = data[:at] + draw(st.binary(min_size=0, max_size=3)) + data[at + 1 :]
    return data


def written(data: bytes, name: str) -> Path:
    folder = Path(tempfile.mkdtemp(prefix="cqr-fuzz-"))
    path = folder / name
    path.write_bytes(data)
    return path


# found by this fuzzing: json raises RecursionError and ValueError (not JSONDecodeError) for these
DEEP_NESTING = b"[" * 100_000 + b"\n"
LONG_INTEGER = b'{"id": "a", "history": [], "question": "q", "positives": [' + b"9" * 5_000 + b"]}\n"


@FUZZ
@given(file_bytes())
@example(DEEP_NESTING)
@example(LONG_INTEGER)
@example(b'{"id": "a", "history": [], "question": "\\udc80", "positives": []}\n')
@example(b'{"id": "a", "history": [], "question": "caf\xe9", "positives": []}\n')
def test_any_bytes_as_a_jsonl_turn_file_give_turns_or_a_data_error(data):
    path = written(data, "turns.jsonl")
    try:
        turns = list(read_jsonl_turns(path, known_ids={"p1", "1"}))
    except DataError as error:
        assert str(error).startswith(str(path))
        return
    assert all(isinstance(turn, Turn) and turn.question.strip() for turn in turns)
    for turn in turns:
        json.dumps([turn.question, *turn.positives, *(u.text for u in turn.history)], ensure_ascii=False).encode()


passages = st.fixed_dictionaries(
    {}, optional={"id": st.one_of(st.text(max_size=6), st.integers(), json_values), "contents": json_values}
)


@FUZZ
@given(file_bytes(passages))
@example(DEEP_NESTING)
@example(b'{"id": ' + b"1" * 5_000 + b', "contents": "x"}\n')
def test_any_bytes_as_a_corpus_give_passages_or_a_data_error(data):
    path = written(data, "corpus.jsonl")
    try:
        found = list(read_corpus(path))
    except DataError as error:
        assert str(error).startswith(str(path))
        return
    assert all(isinstance(p, Passage) and p.id for p in found)
    assert len({p.id for p in found}) == len(found)


@FUZZ
@given(st.one_of(st.binary(max_size=300), st.lists(json_values, max_size=4).map(lambda v: json.dumps(v).encode())))
@example(DEEP_NESTING)
@example(b'[{"Conversation_no": ' + b"1" * 5_000 + b"}]")
def test_any_bytes_as_a_topiocqa_array_or_qrels_file_give_records_or_a_data_error(data):
    for read, name in ((lambda p: list(read_topiocqa_turns(p)), "turns.json"), (read_trec_qrels, "qrels.txt")):
        path = written(data, name)
        try:
            read(path)
        except DataError as error:
            assert str(error).startswith(str(path))
