"""BM25 through Pyserini/Lucene (Anserini's default English analyzer: Porter stemming, Lucene stop words).

This is the retriever the paper trains and evaluates with.  The index is built by Anserini's
`IndexCollection` in a child `java` process; searching goes through pyserini's `LuceneSearcher` in this
process (the JVM starts on first use and stays up until the process exits).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from cqr_lightning.errors import RetrievalError
from cqr_lightning.retrieval.base import Retriever, SearchHit, truncate_words
from cqr_lightning.retrieval.corpus import read_corpus
from cqr_lightning.retrieval.java import anserini_jar, java_env, java_executable, start_jvm

LUCENE_SUBDIR = "lucene"
# Lucene refuses queries of more than 1,024 terms by default (a whole batch_search then fails with
# "queryCount = N is not equal to completedTaskCount"); long rewrites during training can exceed that.
MIN_CLAUSE_LIMIT = 1 << 16


@dataclass(frozen=True)
class LuceneSettings:
    k1: float = 0.9
    b: float = 0.4
    threads: int | None = None  # None: every core this process may use
    store_raw: bool = False  # keep each passage's JSON in the index (Anserini's -storeRaw)

    @property
    def n_threads(self) -> int:
        if self.threads:
            return self.threads
        if hasattr(os, "sched_getaffinity"):
            return len(os.sched_getaffinity(0))
        return os.cpu_count() or 1

    def index_settings(self) -> dict:
        """k1 and b are applied at search time, so one Lucene index serves them all."""
        return {"analyzer": "anserini-default-english", "store_raw": self.store_raw}


def build_index(corpus_path: Path, out_dir: Path, settings: LuceneSettings, show_progress: bool = True) -> int:
    """Index the corpus into `out_dir/lucene`; return the number of passages."""
    input_dir = out_dir / "input"
    input_dir.mkdir()
    doc_count = 0
    with open(input_dir / "corpus.jsonl", "w", encoding="utf-8") as f:
        passages = tqdm(
            read_corpus(corpus_path), desc="bm25: reading corpus", unit=" passages", disable=not show_progress
        )
        for passage in passages:
            f.write(json.dumps({"id": passage.id, "contents": passage.contents}, ensure_ascii=False) + "\n")
            doc_count += 1
    log = run_index_collection(input_dir, out_dir / LUCENE_SUBDIR, settings.n_threads, settings.store_raw)
    (input_dir / "corpus.jsonl").unlink()
    input_dir.rmdir()
    indexed, empty = _indexed_counts(log)
    if indexed is not None and indexed + (empty or 0) != doc_count:
        raise RetrievalError(f"Lucene indexed {indexed} of {doc_count} passages ({empty} empty); log:\n{log[-3000:]}")
    return doc_count


def run_index_collection(input_dir: Path, index_dir: Path, threads: int, store_raw: bool = False) -> str:
    """Run Anserini's IndexCollection on a folder of JsonCollection files; return its log.

    Stored raw passages make the index about 4x bigger and searches about twice as slow (every hit's stored
    fields are decompressed to read its id), so they are off unless asked for.
    """
    command = [
        str(java_executable()),
        "-cp",
        str(anserini_jar()),
        "io.anserini.index.IndexCollection",
        "-collection",
        "JsonCollection",
        "-generator",
        "DefaultLuceneDocumentGenerator",
        "-input",
        str(input_dir),
        "-index",
        str(index_dir),
        "-threads",
        str(threads),
        *(["-storeRaw"] if store_raw else []),
    ]
    proc = subprocess.run(command, env=java_env(), capture_output=True, text=True)
    log = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise RetrievalError(f"Lucene indexing failed (exit {proc.returncode}): {' '.join(command)}\n{log[-3000:]}")
    return log


def _indexed_counts(log: str) -> tuple[int | None, int | None]:
    def counter(name: str) -> int | None:
        match = re.search(rf"\b{name}:\s+([\d,]+)", log)
        return int(match.group(1).replace(",", "")) if match else None

    return counter("indexed"), counter("empty")


def is_lucene_index(folder: Path) -> bool:
    """True for a folder holding a Lucene index (a `segments_N` file)."""
    return folder.is_dir() and any(p.name.startswith("segments_") for p in folder.iterdir())


class LuceneRetriever(Retriever):
    """BM25 over a Lucene index with pyserini's `LuceneSearcher.batch_search`."""

    def __init__(self, lucene_dir: Path, settings: LuceneSettings, max_query_words: int | None = None):
        start_jvm()
        from pyserini.search.lucene import LuceneSearcher

        self.index_dir = Path(lucene_dir)
        self.settings = settings
        self.max_query_words = max_query_words
        try:
            self._searcher = LuceneSearcher(str(self.index_dir))
        except Exception as exc:
            raise RetrievalError(f"Cannot open the Lucene index at {self.index_dir}: {exc}") from exc
        self._searcher.set_bm25(settings.k1, settings.b)
        _raise_clause_limit(max(MIN_CLAUSE_LIMIT, max_query_words or 0))

    @property
    def num_docs(self) -> int:
        return int(self._searcher.num_docs)

    def search(self, queries: Sequence[str], k: int = 100) -> list[list[SearchHit]]:
        if self._searcher is None:
            raise RetrievalError("search() called after close()")
        if not queries:
            return []
        texts = [truncate_words(q, self.max_query_words) for q in queries]
        qids = [str(i) for i in range(len(texts))]
        try:
            results = self._searcher.batch_search(texts, qids, k=k, threads=self.settings.n_threads)
        except Exception as exc:
            raise RetrievalError(f"Lucene search failed: {exc}") from exc
        return [[SearchHit(hit.docid, float(hit.score)) for hit in results.get(qid, [])] for qid in qids]

    def close(self) -> None:
        if self._searcher is not None:
            self._searcher.close()
            self._searcher = None


def _raise_clause_limit(limit: int) -> None:
    """Let Lucene accept queries of up to `limit` terms (a JVM-wide setting, only ever raised)."""
    from jnius import autoclass

    index_searcher = autoclass("org.apache.lucene.search.IndexSearcher")
    if index_searcher.getMaxClauseCount() < limit:
        index_searcher.setMaxClauseCount(limit)
