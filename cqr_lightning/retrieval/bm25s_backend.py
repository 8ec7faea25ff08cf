"""BM25 in pure Python/NumPy with bm25s: no Java, so it also runs on the GPU machine.

The analyzer imitates Anserini's default English analyzer (Lucene StandardTokenizer, English possessive
filter, lower-casing, Lucene's 33 English stop words, Porter stemmer) as far as a regular expression allows,
and `method: lucene` uses Lucene's BM25 formula, so scores and rankings stay close to Pyserini's.  Known
differences: Lucene stores document lengths with lossy one-byte norms, and UAX#29 word breaking is only
approximated.

The index is saved in bm25s' own format (`.npy` arrays written with allow_pickle=False, JSON vocabulary and
parameters) plus `passage_ids.json`; nothing is pickled.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from cqr_lightning.errors import ConfigError, RetrievalError
from cqr_lightning.io_utils import write_json
from cqr_lightning.retrieval.base import Retriever, SearchHit, truncate_words
from cqr_lightning.retrieval.corpus import read_corpus

MODEL_SUBDIR = "bm25s"
IDS_FILE = "passage_ids.json"

LUCENE_PATTERN = "lucene"
# Words as Lucene's StandardTokenizer (UAX#29) keeps them: letters/digits joined across an inner period or
# apostrophe ("u.s", "don't", "3.5"), and digit groups across a comma or semicolon ("1,000").
_LUCENE_WORD = re.compile(r"\w+(?:(?:[.'\u2019]|(?<=\d)[,;](?=\d))\w+)*")
_POSSESSIVE = re.compile(r"['\u2019\uff07]s$")


@dataclass(frozen=True)
class Bm25sSettings:
    k1: float = 0.9
    b: float = 0.4
    method: str = "lucene"
    stemmer: str | None = "porter"
    stopwords: str | list[str] | None = "en"
    token_pattern: str = LUCENE_PATTERN

    def index_settings(self) -> dict:
        """bm25s scores eagerly at index time, so every setting shapes the index."""
        return dataclasses.asdict(self)


class EnglishAnalyzer:
    """Text -> index terms: split, lower-case, drop possessive 's, drop stop words, stem (with a cache)."""

    def __init__(self, token_pattern: str, stemmer: str | None, stopwords: str | Sequence[str] | None):
        self._lucene_like = token_pattern == LUCENE_PATTERN
        self._split = _LUCENE_WORD.findall if self._lucene_like else re.compile(token_pattern).findall
        self._stem = _stemmer(stemmer)
        self._stopwords = _stopwords(stopwords)
        self._terms: dict[str, str] = {}

    def __call__(self, text: str) -> list[str]:
        terms = []
        for word in self._split(text.lower()):
            term = self._terms.get(word)
            if term is None:
                term = self._terms[word] = self._term(word)
            if term:
                terms.append(term)
        return terms

    def _term(self, word: str) -> str:
        """The index term of one word, "" when it is dropped."""
        if self._lucene_like:
            word = _POSSESSIVE.sub("", word)
        if not word or word in self._stopwords:
            return ""
        return self._stem(word) if self._stem else word


def _stemmer(name: str | None) -> Callable[[str], str] | None:
    if not name:
        return None
    try:
        import Stemmer
    except ImportError:
        raise ConfigError("retriever.stemmer needs PyStemmer: `pip install PyStemmer==3.0.0`.") from None
    try:
        return Stemmer.Stemmer(name).stemWord
    except KeyError:
        choices = ", ".join(sorted(Stemmer.algorithms()))
        raise ConfigError(f"retriever.stemmer={name!r} is not a PyStemmer algorithm ({choices})") from None


def _stopwords(stopwords: str | Sequence[str] | None) -> frozenset[str]:
    if not stopwords:
        return frozenset()
    if isinstance(stopwords, str):
        if stopwords.lower() not in ("en", "english"):
            raise ConfigError(f"retriever.stopwords={stopwords!r}: use en, null, or a list of words")
        from bm25s.stopwords import STOPWORDS_EN  # Lucene's English stop set (33 words)

        return frozenset(STOPWORDS_EN)
    return frozenset(word.lower() for word in stopwords)


def make_analyzer(settings: Bm25sSettings) -> EnglishAnalyzer:
    return EnglishAnalyzer(settings.token_pattern, settings.stemmer, settings.stopwords)


def _import_bm25s():
    import bm25s  # JAX, which bm25s would use, is kept off the GPU in cqr_lightning/__init__.py

    # bm25s sets its own logger to DEBUG at import; once any root handler exists (pyserini adds one)
    # every index build would print debug lines.
    logging.getLogger("bm25s").setLevel(logging.WARNING)
    return bm25s


def build_index(corpus_path: Path, out_dir: Path, settings: Bm25sSettings, show_progress: bool = True) -> int:
    """Tokenize and score the corpus into `out_dir`; return the number of passages."""
    from bm25s.tokenization import Tokenized

    bm25s = _import_bm25s()

    analyzer = make_analyzer(settings)
    vocab: dict[str, int] = {}
    passage_ids: list[str] = []
    docs: list[list[int]] = []
    passages = tqdm(read_corpus(corpus_path), desc="bm25s: tokenizing", unit=" passages", disable=not show_progress)
    for passage in passages:
        passage_ids.append(passage.id)
        docs.append([vocab.setdefault(term, len(vocab)) for term in analyzer(passage.contents)])
    try:
        model = bm25s.BM25(k1=settings.k1, b=settings.b, method=settings.method)
    except ValueError as exc:
        raise ConfigError(f"retriever settings rejected by bm25s: {exc}") from exc
    model.index(Tokenized(ids=docs, vocab=vocab), show_progress=show_progress)
    model.save(str(out_dir / MODEL_SUBDIR), show_progress=False)
    write_json(out_dir / IDS_FILE, passage_ids)
    return len(passage_ids)


class Bm25sRetriever(Retriever):
    """Loads a saved bm25s index; queries go through the same analyzer as the passages."""

    def __init__(self, index_dir: Path, settings: Bm25sSettings, max_query_words: int | None = None):
        bm25s = _import_bm25s()

        self.index_dir = Path(index_dir)
        self.settings = settings
        self.max_query_words = max_query_words
        try:
            self._model = bm25s.BM25.load(str(self.index_dir / MODEL_SUBDIR), show_progress=False)
            with open(self.index_dir / IDS_FILE, encoding="utf-8") as f:
                self._passage_ids: list[str] = json.load(f)
        except (OSError, ValueError) as exc:
            raise RetrievalError(f"Cannot load the bm25s index at {self.index_dir}: {exc}") from exc
        self._analyzer = make_analyzer(settings)
        self._vocab: dict[str, int] = self._model.vocab_dict

    @property
    def num_docs(self) -> int:
        return len(self._passage_ids)

    def search(self, queries: Sequence[str], k: int = 100) -> list[list[SearchHit]]:
        runs: list[list[SearchHit]] = [[] for _ in queries]
        query_ids = [self._term_ids(truncate_words(q, self.max_query_words)) for q in queries]
        answerable = [i for i, ids in enumerate(query_ids) if ids]
        depth = min(k, self.num_docs)
        if not answerable or depth <= 0:
            return runs
        docs, scores = self._model.retrieve(
            [query_ids[i] for i in answerable], k=depth, show_progress=False, backend_selection="numpy"
        )
        for row, i in enumerate(answerable):
            # bm25s fills the top k with non-matching passages at score 0; Lucene returns only matches.
            runs[i] = [
                SearchHit(self._passage_ids[int(doc)], float(score))
                for doc, score in zip(docs[row], scores[row], strict=True)
                if score > 0
            ]
        return runs

    def _term_ids(self, text: str) -> list[int]:
        return [self._vocab[term] for term in self._analyzer(text) if term in self._vocab]
