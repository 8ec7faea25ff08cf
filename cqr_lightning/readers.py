"""Readers that turn conversational search files into `Turn` records, lazily.

Supported inputs:
- the project's JSONL (one turn per line; the form of ../shared/data/convsearch-pack);
- TopiOCQA's official JSON array (`Gold_passage` optional: without it a turn has no positives);
- QReCC's official JSON array plus a TREC qrels file giving the gold passages of each turn.

Every problem is reported as a `DataError` naming the file and the line where the record starts.
"""

from __future__ import annotations

import gzip
import json
import re
import zlib
from collections.abc import Callable, Container, Iterator
from pathlib import Path

from cqr_lightning.errors import ConfigError, DataError
from cqr_lightning.records import ASSISTANT, USER, Turn, Utterance

_CHUNK_CHARS = 1 << 20
_MAX_RECORD_CHARS = 64 << 20


# bytes that are not UTF-8 come out of the "surrogateescape" error handler as these code points
_UNDECODABLE = re.compile("[\udc80-\udcff]")


def check_utf8(path: Path, text: str, line: int, column_known: bool = True) -> str:
    """`text` (read with errors="surrogateescape", starting on `line`), or a DataError naming the line (and column,
    when `text` starts at the start of a line) of its first byte that is not UTF-8."""
    bad = _UNDECODABLE.search(text)
    if bad is None:
        return text
    line += text.count("\n", 0, bad.start())
    newline = text.rfind("\n", 0, bad.start())
    column = f" at column {bad.start() - newline}" if column_known or newline >= 0 else ""
    byte = ord(bad.group()) - 0xDC00
    raise DataError(path, f"invalid UTF-8 (byte 0x{byte:02x}{column}); save the file as UTF-8", line)


def iter_text_lines(path: str | Path) -> Iterator[tuple[int, str]]:
    """Yield (line number, line) of a UTF-8 text file, gzipped when its name ends in .gz; a byte that is not UTF-8
    raises a DataError naming its line, a damaged gzip stream one naming the line it stopped after."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    line_no = 0
    try:
        with opener(path, "rt", encoding="utf-8", errors="surrogateescape") as handle:
            for line_no, line in enumerate(handle, start=1):
                yield line_no, check_utf8(path, line, line_no)
    except (OSError, EOFError, zlib.error) as err:
        if opener is open or isinstance(err, FileNotFoundError):
            raise
        raise DataError(path, f"not a readable gzip file ({err}) after line {line_no}; re-compress it") from None


def iter_jsonl_objects(path: str | Path) -> Iterator[tuple[int, dict]]:
    """Yield (line number, object) for each non-blank line of a JSONL file."""
    path = Path(path)
    if not path.is_file():
        raise DataError(path, "file not found")
    for line_no, line in iter_text_lines(path):
        if not line.strip():
            continue
        obj = parse_json(path, line, line_no)
        if not isinstance(obj, dict):
            raise DataError(path, f"expected a JSON object, got {type(obj).__name__}", line_no)
        if "\\u" in line:  # an escape may spell half of a surrogate pair, which no UTF-8 text can hold
            check_no_lone_surrogate(path, obj, line_no)
        yield line_no, obj


def parse_json(path: Path, text: str, line: int):
    """`json.loads(text)`, any failure a DataError: malformed JSON, but also nesting too deep for the parser and
    integers longer than Python converts (ValueError), which the json module does not report as JSON errors."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(path, f"malformed JSON ({err.msg} at column {err.colno})", line) from None
    except (ValueError, RecursionError) as err:
        raise unreadable_json(path, err, line) from None


def unreadable_json(path: Path, err: Exception, line: int) -> DataError:
    """JSON the parser cannot turn into Python objects (nesting too deep, an integer too long)."""
    return DataError(path, f"unreadable JSON ({type(err).__name__}: {str(err)[:200]})", line)


def check_no_lone_surrogate(path: Path, obj: dict, line: int) -> None:
    try:
        json.dumps(obj, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise DataError(path, "a \\uXXXX escape spells an unpaired UTF-16 surrogate, which is not text", line) from None


def iter_json_array(path: str | Path) -> Iterator[tuple[int, dict]]:
    """Stream the objects of a top-level JSON array without loading the whole file.

    Yields (line number where the object starts, object).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(path, "file not found")
    decoder = json.JSONDecoder()
    with path.open(encoding="utf-8", errors="surrogateescape") as handle:
        lines_read, at_line_start = 0, True  # newlines in the chunks read so far; whether the last one ended a line

        def read_chunk() -> str:
            nonlocal lines_read, at_line_start
            chunk = handle.read(_CHUNK_CHARS)
            check_utf8(path, chunk, lines_read + 1, column_known=at_line_start)
            lines_read += chunk.count("\n")
            at_line_start = chunk.endswith("\n") if chunk else at_line_start
            return chunk

        buffer = read_chunk()
        at_eof = not buffer
        pos, line_no = 0, 1

        def skip(chars: str) -> None:
            nonlocal pos, line_no
            while pos < len(buffer) and buffer[pos] in chars:
                line_no += buffer[pos] == "\n"
                pos += 1

        skip(" \t\r\n")
        if not buffer[pos:].startswith("["):
            raise DataError(path, "expected a JSON array of turns", line_no)
        pos += 1
        expect_value = True
        while True:
            skip(" \t\r\n")
            if pos >= len(buffer) - 1 and not at_eof:
                chunk = read_chunk()
                at_eof = not chunk
                buffer, pos = buffer[pos:] + chunk, 0
                continue
            if pos >= len(buffer):
                raise DataError(path, "unexpected end of file inside the array", line_no)
            if buffer[pos] == "]":
                return
            if buffer[pos] == "," and not expect_value:
                pos += 1
                expect_value = True
                continue
            try:
                obj, end = decoder.raw_decode(buffer, pos)
            except json.JSONDecodeError as err:
                if not at_eof and len(buffer) - pos < _MAX_RECORD_CHARS:
                    chunk = read_chunk()
                    at_eof = not chunk
                    buffer, pos = buffer[pos:] + chunk, 0
                    continue
                raise DataError(
                    path, f"malformed JSON ({err.msg})", line_no + buffer.count("\n", pos, err.pos)
                ) from None
            except (ValueError, RecursionError) as err:
                raise unreadable_json(path, err, line_no) from None
            if not isinstance(obj, dict):
                raise DataError(path, f"expected a JSON object, got {type(obj).__name__}", line_no)
            yield line_no, obj
            line_no += buffer.count("\n", pos, end)
            pos = end
            expect_value = False


def _field(obj: dict, name: str, kind: type | tuple[type, ...], path: Path, line: int, optional: bool = False):
    if name not in obj or obj[name] is None:
        if optional:
            return None
        raise DataError(path, f"missing field '{name}'", line)
    value = obj[name]
    if not isinstance(value, kind):
        raise DataError(path, f"field '{name}' should be {_kind_name(kind)}, got {type(value).__name__}", line)
    return value


def _kind_name(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join(k.__name__ for k in kinds)


def _check_positives(turn: Turn, known_ids: Container[str] | None, path: Path, line: int) -> Turn:
    if known_ids is not None:
        for pid in turn.positives:
            if pid not in known_ids:
                raise DataError(path, f"turn '{turn.id}': positive passage id '{pid}' is not in the corpus", line)
    return turn


def _require_text(value: str, what: str, path: Path, line: int) -> str:
    if not value.strip():
        raise DataError(path, f"{what} is empty", line)
    return value


def read_jsonl_turns(
    path: str | Path, known_ids: Container[str] | None = None, positives_optional: bool = False
) -> Iterator[Turn]:
    """Turns in the project's JSONL form: id, history [{role, text}], question, positives, rewrite?, answer?

    `positives` is required (a list, possibly empty) unless `positives_optional`, for turns that are only rewritten
    (`python -m cqr_lightning.rewrite`): a missing or null `positives` then reads as none."""
    path = Path(path)
    for line, obj in iter_jsonl_objects(path):
        turn_id = str(_field(obj, "id", (str, int), path, line))
        history = []
        for i, item in enumerate(_field(obj, "history", list, path, line)):
            if not isinstance(item, dict) or item.get("role") not in (USER, ASSISTANT):
                raise DataError(path, f"history[{i}] must be {{'role': 'user'|'assistant', 'text': str}}", line)
            text = _field(item, "text", str, path, line)
            history.append(Utterance(item["role"], _require_text(text, f"history[{i}].text", path, line)))
        positives = _field(obj, "positives", list, path, line, optional=positives_optional) or []
        if not all(isinstance(p, (str, int)) for p in positives):
            raise DataError(path, "field 'positives' must list passage ids", line)
        turn = Turn(
            id=turn_id,
            history=tuple(history),
            question=_require_text(_field(obj, "question", str, path, line), "question", path, line),
            positives=tuple(str(p) for p in positives),
            rewrite=_field(obj, "rewrite", str, path, line, optional=True),
            answer=_field(obj, "answer", str, path, line, optional=True),
            source=_field(obj, "source", str, path, line, optional=True),
        )
        yield _check_positives(turn, known_ids, path, line)


def _alternating_context(context: list, path: Path, line: int) -> tuple[Utterance, ...]:
    """Official TopiOCQA/QReCC `Context`: question, answer, question, answer, ..."""
    if not all(isinstance(text, str) for text in context):
        raise DataError(path, "field 'Context' must be a list of strings", line)
    return tuple(Utterance(USER if i % 2 == 0 else ASSISTANT, text) for i, text in enumerate(context))


def read_topiocqa_turns(
    path: str | Path, known_ids: Container[str] | None = None, require_gold: bool = False
) -> Iterator[Turn]:
    """TopiOCQA official JSON. Turn ids are `<Conversation_no>_<Turn_no>`; the gold id is `Gold_passage.id`."""
    path = Path(path)
    for line, obj in iter_json_array(path):
        conv = _field(obj, "Conversation_no", (int, str), path, line)
        turn_no = _field(obj, "Turn_no", (int, str), path, line)
        gold = _field(obj, "Gold_passage", dict, path, line, optional=True)
        if gold is None and require_gold:
            raise DataError(path, f"turn {conv}_{turn_no} has no 'Gold_passage' (needed for retrieval)", line)
        positives = ()
        if gold is not None:
            positives = (str(_field(gold, "id", (str, int), path, line)),)
        turn = Turn(
            id=f"{conv}_{turn_no}",
            history=_alternating_context(_field(obj, "Context", list, path, line), path, line),
            question=_require_text(_field(obj, "Question", str, path, line), "Question", path, line),
            positives=positives,
            answer=_field(obj, "Answer", str, path, line, optional=True),
            source="topiocqa",
            extra={"topic": obj.get("Topic")},
        )
        yield _check_positives(turn, known_ids, path, line)


def read_trec_qrels(path: str | Path) -> dict[str, list[str]]:
    """TREC qrels (`qid iteration docid relevance`): query id -> ids of passages with relevance > 0."""
    path = Path(path)
    if not path.is_file():
        raise DataError(path, "qrels file not found")
    qrels: dict[str, list[str]] = {}
    for line_no, line in iter_text_lines(path):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 4:
            raise DataError(path, f"expected 'qid iteration docid relevance', got {len(parts)} fields", line_no)
        try:
            relevance = int(parts[3])
        except ValueError:
            raise DataError(path, f"relevance '{parts[3]}' is not an integer", line_no) from None
        if relevance > 0:
            qrels.setdefault(parts[0], []).append(parts[2])
    return qrels


def read_qrecc_turns(
    path: str | Path, qrels_path: str | Path, known_ids: Container[str] | None = None
) -> Iterator[Turn]:
    """QReCC official JSON with a qrels file keyed `<Conversation_source>_<Conversation_no>_<Turn_no>`.

    Turns that the qrels file does not list have no gold passage and are skipped, as in the paper's
    evaluation (8,209 test turns with gold passages).
    """
    path = Path(path)
    qrels = read_trec_qrels(qrels_path)
    for line, obj in iter_json_array(path):
        conv = _field(obj, "Conversation_no", (int, str), path, line)
        turn_no = _field(obj, "Turn_no", (int, str), path, line)
        source = _field(obj, "Conversation_source", str, path, line, optional=True) or "qrecc"
        turn_id = f"{source}_{conv}_{turn_no}"
        if turn_id not in qrels:
            continue
        turn = Turn(
            id=turn_id,
            history=_alternating_context(_field(obj, "Context", list, path, line), path, line),
            question=_require_text(_field(obj, "Question", str, path, line), "Question", path, line),
            positives=tuple(qrels[turn_id]),
            rewrite=_field(obj, "Rewrite", str, path, line, optional=True),
            answer=_field(obj, "Answer", str, path, line, optional=True),
            source=source,
        )
        yield _check_positives(turn, known_ids, path, line)


def split_path(data_cfg, split: str) -> Path:
    """The turn file of a split: `<dir>/<split>.jsonl` (jsonl) or `<dir>/<split>.json` (official formats)."""
    suffix = ".jsonl" if data_cfg.format == "jsonl" else ".json"
    candidate = Path(str(split))
    return candidate if candidate.suffix in (".jsonl", ".json") else Path(data_cfg.dir) / f"{split}{suffix}"


def validation_split(data_cfg) -> str:
    """The split training validates on: `data.val_split` (for example `holdout_val`), else `data.eval_split`."""
    return str(data_cfg.get("val_split") or data_cfg.eval_split)


def turn_reader(data_cfg, split: str, known_ids: Container[str] | None = None) -> Callable[[], Iterator[Turn]]:
    """A zero-argument factory of fresh turn iterators for one split, chosen by `data.format`.

    With `data.holdout` shares, the training split leaves out its held-out conversations, and the split names
    `holdout_val` and `holdout_test` read them (cqr_lightning/holdout.py)."""
    from cqr_lightning.holdout import HOLDOUT_SPLITS, TRAIN_PART, holdout_part, holdout_shares

    val_share, test_share = holdout_shares(data_cfg)
    if split in HOLDOUT_SPLITS and not (val_share if split == HOLDOUT_SPLITS[0] else test_share):
        raise ConfigError(f"split '{split}' is empty: set data.holdout.{split.split('_')[1]} to a share above 0")
    part = split if split in HOLDOUT_SPLITS else TRAIN_PART if str(split) == str(data_cfg.train_split) else None
    read = _file_reader(data_cfg, data_cfg.train_split if split in HOLDOUT_SPLITS else split, known_ids)
    if part is None or not (val_share or test_share):
        return read
    return lambda: (turn for turn in read() if holdout_part(turn, val_share, test_share) == part)


def _file_reader(data_cfg, split: str, known_ids: Container[str] | None) -> Callable[[], Iterator[Turn]]:
    path = split_path(data_cfg, split)
    fmt = data_cfg.format
    if fmt == "jsonl":
        return lambda: read_jsonl_turns(path, known_ids)
    if fmt == "topiocqa":
        return lambda: read_topiocqa_turns(path, known_ids)
    if fmt == "qrecc":
        if not data_cfg.get("qrels"):
            raise DataError(path, "QReCC needs a qrels file: set data.qrels=PATH")
        return lambda: read_qrecc_turns(path, data_cfg.qrels, known_ids)
    raise ValueError(f"unknown data.format '{fmt}': use jsonl, topiocqa or qrecc")
