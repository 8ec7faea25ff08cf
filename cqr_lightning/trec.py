"""TREC files of an evaluation, for trec_eval and other IR tools: the run (`qid Q0 docid rank score tag`) and the
qrels (`qid 0 docid 1`).

trec_eval orders a query's passages by score and breaks ties by passage id, not by the rank column (and
pytrec_eval compares scores in single precision). `run_scores` therefore keeps the retriever's scores where each is
clearly below the one before it and otherwise writes the previous score less a small step (`TIE_STEP`, relative to
its size): the run read back ranks the passages exactly as they were scored here, and trec_eval's figures equal
metrics.json's.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

from cqr_lightning.io_utils import atomic_file
from cqr_lightning.records import Turn

TIE_STEP = 1e-5  # relative gap kept between consecutive scores: several float32 steps at any magnitude


def run_scores(ids: Sequence[str], scores: Sequence[float]) -> list[tuple[str, float]]:
    """(passage id, score) best first: repeated ids dropped, scores made clearly decreasing (ties nudged down)."""
    if len(ids) != len(scores):
        raise ValueError(f"{len(ids)} passage ids but {len(scores)} scores")
    seen: set[str] = set()
    ranked: list[tuple[str, float]] = []
    for passage_id, score in zip(ids, scores, strict=True):
        if passage_id in seen:
            continue
        seen.add(passage_id)
        score = float(score)
        if ranked:
            previous = ranked[-1][1]
            score = min(score, previous - TIE_STEP * max(1.0, abs(previous)))
        ranked.append((passage_id, score))
    return ranked


def _check_word(value: str, what: str) -> None:
    if not value or any(c.isspace() for c in value):
        raise ValueError(f"a {what} in a TREC file must be one word, got {value!r}")


def run_lines(rankings: Iterable[tuple[str, Sequence[str], Sequence[float]]], tag: str) -> Iterable[str]:
    """Lines of a TREC run from (query id, passage ids best first, their scores)."""
    _check_word(tag, "run tag")
    for query_id, ids, scores in rankings:
        _check_word(query_id, "turn id")
        for rank, (passage_id, score) in enumerate(run_scores(ids, scores), start=1):
            yield f"{query_id} Q0 {passage_id} {rank} {score!r} {tag}\n"


def qrels_lines(turns: Iterable[Turn]) -> Iterable[str]:
    """Lines of TREC qrels: every positive passage of every turn, relevance 1 (turns without positives give none)."""
    for turn in turns:
        _check_word(turn.id, "turn id")
        for passage_id in dict.fromkeys(turn.positives):
            yield f"{turn.id} 0 {passage_id} 1\n"


def write_lines(path: str | Path, lines: Iterable[str]) -> Path:
    """Write the lines through a temporary file renamed into place."""
    with atomic_file(path) as handle:
        handle.writelines(lines)
    return Path(path)
