"""Reading a passage collection in Pyserini's JsonCollection form, one JSON object per line.

A line is `{"id": ..., "contents": ..., "title": ...?}`; `contents` is what gets indexed and usually
already starts with the title, so the title is kept only as metadata.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from cqr_lightning.errors import DataError
from cqr_lightning.readers import iter_text_lines, parse_json

FULL_HASH_LIMIT = 1 << 30
"""Corpora up to this size (1 GiB) are fingerprinted by a full SHA-1 of their bytes."""

_SAMPLE_BYTES = 1 << 22


@dataclass(frozen=True)
class Passage:
    id: str
    contents: str
    title: str | None = None


def read_corpus(path: str | os.PathLike) -> Iterator[Passage]:
    """Stream the passages of a JSONL corpus, checking every line as it goes.

    Raises DataError naming the file and line for malformed JSON, a missing or non-string `id` or
    `contents`, and an id seen before.  Blank lines are skipped.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(path, "corpus file not found")
    seen: set[str] = set()
    for line_no, line in iter_text_lines(path):
        if not line.strip():
            continue
        passage = _parse_line(path, line, line_no)
        if passage.id in seen:
            raise DataError(path, f"duplicate passage id {passage.id!r}", line_no)
        seen.add(passage.id)
        yield passage


def count_passages(path: str | os.PathLike) -> int:
    """Validate the whole corpus and return its number of passages."""
    return sum(1 for _ in read_corpus(path))


def _parse_line(path: Path, line: str, line_no: int) -> Passage:
    record = parse_json(path, line, line_no)
    if not isinstance(record, dict):
        raise DataError(path, f"expected a JSON object, got {type(record).__name__}", line_no)
    passage_id = record.get("id")
    if isinstance(passage_id, int) and not isinstance(passage_id, bool):
        passage_id = str(passage_id)
    if not isinstance(passage_id, str) or not passage_id:
        raise DataError(path, 'missing or empty "id" (a string is expected)', line_no)
    contents = record.get("contents")
    if not isinstance(contents, str):
        raise DataError(path, f'passage {passage_id!r} has no "contents" string', line_no)
    title = record.get("title")
    return Passage(passage_id, contents, title if isinstance(title, str) else None)


def corpus_fingerprint(path: str | os.PathLike) -> str:
    """A content key for the corpus, used to name and check cached indexes.

    Files up to FULL_HASH_LIMIT get a SHA-1 of all their bytes, so copying or touching the file keeps its
    key.  Larger collections (TopiOCQA's is about 13 GB) would take minutes to hash on every start, so they
    get a SHA-1 of their size, modification time and the first, middle and last 4 MiB instead.
    """
    path = Path(path)
    try:
        stat = path.stat()
    except OSError as exc:
        raise DataError(path, f"cannot read corpus ({exc.strerror})") from None
    digest = hashlib.sha1()
    digest.update(f"size={stat.st_size};".encode())
    with open(path, "rb") as f:
        if stat.st_size <= FULL_HASH_LIMIT:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
            return f"sha1:{digest.hexdigest()}"
        digest.update(f"mtime_ns={stat.st_mtime_ns};".encode())
        for offset in (0, stat.st_size // 2, stat.st_size - _SAMPLE_BYTES):
            f.seek(offset)
            digest.update(f.read(_SAMPLE_BYTES))
    return f"sampled-sha1:{digest.hexdigest()}"
