"""Open a retriever from its config (`conf/retriever/*.yaml`): build its index once, reuse it afterwards.

Indexes are built into a hidden temporary folder next to their target and renamed into place at the end
(`cqr_lightning.io_utils.atomic_dir`), so a crash never leaves a half index where a complete one is
expected.  Every index built here holds `manifest.json`: backend, the settings the index depends on, the
corpus fingerprint, passage count and build time.

Where the index lives:
* `index_dir: null` -> `<cache_dir>/indexes/<name>-<key>`, where `cache_dir` is `$CQR_CACHE_DIR`
  (default `~/.cache/cqr_lightning`) and `key` hashes the backend, its index settings and the corpus
  fingerprint: a changed corpus or setting gets a new index instead of a stale one.
* `index_dir: <path>` -> that folder: loaded if it holds an index built here (its manifest must match the
  settings and, when a corpus is given, the corpus) or, for `bm25`, a prebuilt Pyserini/Lucene index
  (then no corpus is needed); built there if it is missing or empty.

If two processes build the same index at once, both finish: the first rename wins and the other process
uses that index and discards its own.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, MissingMandatoryValue, OmegaConf

from cqr_lightning import __version__
from cqr_lightning.config import cache_dir
from cqr_lightning.errors import ConfigError, RetrievalError
from cqr_lightning.io_utils import TargetExistsError, atomic_dir, write_json
from cqr_lightning.retrieval.base import Retriever
from cqr_lightning.retrieval.corpus import corpus_fingerprint

MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1
COMMON_KEYS = ("name", "k", "max_query_words", "index_dir")


@dataclass(frozen=True)
class Backend:
    settings_type: type
    build: Callable[[Path, Path, Any, bool], int]
    load: Callable[[Path, Any, int | None], Retriever]


@dataclass(frozen=True)
class RetrieverConfig:
    name: str
    k: int
    max_query_words: int | None
    index_dir: Path | None
    settings: Any  # the backend's settings dataclass


@dataclass(frozen=True)
class IndexInfo:
    path: Path
    backend: str
    reused: bool
    manifest: dict | None  # None for a prebuilt Lucene index

    @property
    def doc_count(self) -> int | None:
        return self.manifest["doc_count"] if self.manifest else None

    @property
    def build_seconds(self) -> float | None:
        return self.manifest["build_seconds"] if self.manifest else None


def backend(name: str) -> Backend:
    """The backend called `name`; its module (and heavy dependencies) are imported only here."""
    if name == "bm25":
        from cqr_lightning.retrieval import lucene_backend as lucene

        def load_lucene(path: Path, settings: Any, max_query_words: int | None) -> Retriever:
            inner = path / lucene.LUCENE_SUBDIR
            return lucene.LuceneRetriever(inner if inner.is_dir() else path, settings, max_query_words)

        return Backend(lucene.LuceneSettings, lucene.build_index, load_lucene)
    if name == "bm25s":
        from cqr_lightning.retrieval import bm25s_backend as bm25s

        return Backend(bm25s.Bm25sSettings, bm25s.build_index, bm25s.Bm25sRetriever)
    if name == "dense":
        from cqr_lightning.retrieval import dense_backend as dense

        return Backend(dense.DenseSettings, dense.build_index, dense.DenseRetriever)
    raise ConfigError(f"retriever.name={name!r}: choose bm25 (Pyserini/Lucene), bm25s or dense")


def parse_config(cfg: Mapping) -> RetrieverConfig:
    """Check a retriever config (DictConfig or plain mapping) and split common keys from backend settings."""
    options = _plain_dict(cfg)
    name = options.pop("name", None)
    if not isinstance(name, str):
        raise ConfigError("retriever.name is missing: choose bm25, bm25s or dense")
    settings_type = backend(name).settings_type
    k = options.pop("k", 100)
    max_query_words = options.pop("max_query_words", None)
    index_dir = options.pop("index_dir", None)
    if not isinstance(k, int) or k < 1:
        raise ConfigError(f"retriever.k={k!r} must be a positive integer")
    if max_query_words is not None and (not isinstance(max_query_words, int) or max_query_words < 1):
        raise ConfigError(f"retriever.max_query_words={max_query_words!r} must be a positive integer or null")
    known = {f.name for f in dataclasses.fields(settings_type)}
    unknown = sorted(set(options) - known)
    if unknown:
        valid = ", ".join(sorted(known | set(COMMON_KEYS)))
        raise ConfigError(f"unknown retriever setting(s) {', '.join(unknown)} for {name}; valid keys: {valid}")
    try:
        settings = settings_type(**options)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"retriever settings for {name}: {exc}") from exc
    path = Path(str(index_dir)).expanduser() if index_dir not in (None, "") else None
    if path is not None:
        check_not_a_prebuilt_name(str(index_dir), path)
    return RetrieverConfig(name, k, max_query_words, path, settings)


def check_not_a_prebuilt_name(written: str, path: Path) -> None:
    """A bare name that is no folder here (`msmarco-v1-passage`) reads like a Pyserini prebuilt index, which is
    never downloaded; building a new index in a folder of that name would hide the mistake. `./name` builds there."""
    if "/" in written or os.sep in written or written.startswith(("~", ".")) or path.exists():
        return
    raise ConfigError(
        f"retriever.index_dir={written} is not a folder here. Prebuilt Pyserini index names are not downloaded: "
        f"fetch the index yourself and give its folder; to build a new index in a folder of that name, write "
        f"retriever.index_dir=./{written}"
    )


def default_index_dir(name: str, index_settings: dict, fingerprint: str) -> Path:
    key = _hash_json({"backend": name, "settings": index_settings, "corpus": fingerprint})[:16]
    return cache_dir() / "indexes" / f"{name}-{key}"


def read_manifest(index_dir: Path) -> dict | None:
    """The manifest of a complete index built here, None if there is none."""
    path = Path(index_dir) / MANIFEST
    if not path.is_file():
        return None
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as exc:
        raise RetrievalError(f"{path} is unreadable ({exc}); delete {index_dir} to rebuild it") from exc


def ensure_index(cfg: Mapping, corpus_path: str | Path | None, show_progress: bool = True) -> IndexInfo:
    """Find the index `cfg` asks for, building it from `corpus_path` if it does not exist yet."""
    return _ensure_index(parse_config(cfg), corpus_path, show_progress)


def open_retriever(cfg: Mapping, corpus_path: str | Path | None, show_progress: bool = True) -> Retriever:
    """A ready retriever for `cfg` (see `conf/retriever/*.yaml`), building its index first if needed.

    `corpus_path` may be None when `cfg.index_dir` names an existing index.  Queries are cut to
    `cfg.max_query_words` words by the backend; `cfg.k` is the depth callers should ask `search` for.
    """
    config = parse_config(cfg)
    info = _ensure_index(config, corpus_path, show_progress)
    return backend(config.name).load(info.path, config.settings, config.max_query_words)


def _ensure_index(config: RetrieverConfig, corpus_path: str | Path | None, show_progress: bool) -> IndexInfo:
    index_settings = config.settings.index_settings()
    corpus = Path(corpus_path) if corpus_path is not None else None
    fingerprint = corpus_fingerprint(corpus) if corpus is not None else None
    target = config.index_dir
    if target is None:
        if fingerprint is None:
            raise ConfigError("no corpus given: set data.corpus, or retriever.index_dir to an existing index")
        target = default_index_dir(config.name, index_settings, fingerprint)
    manifest = read_manifest(target)
    if manifest is not None:
        _check_manifest(target, manifest, config.name, index_settings, fingerprint)
        return IndexInfo(target, config.name, reused=True, manifest=manifest)
    if config.name == "bm25":
        from cqr_lightning.retrieval.lucene_backend import is_lucene_index

        if is_lucene_index(target):
            return IndexInfo(target, config.name, reused=True, manifest=None)
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise ConfigError(
            f"retriever.index_dir={target} exists but holds no index built by cqr_lightning"
            f"{' nor a Lucene index' if config.name == 'bm25' else ''}; empty it, delete it or choose another folder"
        )
    if corpus is None:
        raise ConfigError(f"no index at {target} and no corpus to build one from: set data.corpus")
    return _build(config, corpus, fingerprint, target, index_settings, show_progress)


def _build(
    config: RetrieverConfig, corpus: Path, fingerprint: str, target: Path, index_settings: dict, show_progress: bool
) -> IndexInfo:
    started = time.perf_counter()
    try:
        with atomic_dir(target) as tmp:
            doc_count = backend(config.name).build(corpus, tmp, config.settings, show_progress)
            manifest = {
                "format": MANIFEST_FORMAT,
                "backend": config.name,
                "settings": index_settings,
                "corpus": {"path": str(corpus.resolve()), "fingerprint": fingerprint},
                "doc_count": doc_count,
                "build_seconds": round(time.perf_counter() - started, 3),
                "created": datetime.now(UTC).isoformat(timespec="seconds"),
                "cqr_lightning_version": __version__,
            }
            write_json(tmp / MANIFEST, manifest)
    except TargetExistsError:
        manifest = read_manifest(target)
        if manifest is None:
            raise RetrievalError(f"{target} was created by someone else while this index was built") from None
        _check_manifest(target, manifest, config.name, index_settings, fingerprint)
        return IndexInfo(target, config.name, reused=True, manifest=manifest)
    return IndexInfo(target, config.name, reused=False, manifest=manifest)


def _check_manifest(path: Path, manifest: dict, name: str, index_settings: dict, fingerprint: str | None) -> None:
    problems = []
    if manifest.get("backend") != name:
        problems.append(f"it is a {manifest.get('backend')!r} index, not {name!r}")
    if _hash_json(manifest.get("settings")) != _hash_json(index_settings):
        problems.append(f"it was built with {manifest.get('settings')}, not {index_settings}")
    built_from = manifest.get("corpus", {}).get("fingerprint")
    if fingerprint is not None and built_from != fingerprint:
        problems.append(f"it was built from another corpus ({manifest.get('corpus', {}).get('path')})")
    if problems:
        raise ConfigError(
            f"retriever.index_dir={path} does not fit: {'; '.join(problems)}. Delete it, or set "
            "retriever.index_dir=null to use a cached index keyed by corpus and settings."
        )


def _plain_dict(cfg: Mapping) -> dict:
    if isinstance(cfg, DictConfig):
        try:
            return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
        except MissingMandatoryValue as exc:
            key = exc.full_key if exc.full_key.startswith("retriever.") else f"retriever.{exc.full_key}"
            raise ConfigError(f"{key} must be set (it is ??? in the config)") from exc
    if not isinstance(cfg, Mapping):
        raise ConfigError(f"retriever config must be a mapping, got {type(cfg).__name__}")
    return dict(cfg)


def _hash_json(value: object) -> str:
    return hashlib.sha1(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()
