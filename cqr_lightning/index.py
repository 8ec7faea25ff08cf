"""Build (or find) the retriever's index: `python -m cqr_lightning.index retriever=bm25s [data=...]`.

Indexes are otherwise built on first use by `open_retriever`; running this first keeps slow builds out of
training and evaluation jobs.
"""

from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig

from cqr_lightning.config import register_resolvers
from cqr_lightning.errors import DataError, user_errors_reported
from cqr_lightning.retrieval.corpus import read_corpus
from cqr_lightning.retrieval.factory import IndexInfo, ensure_index

CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")


def run(cfg: DictConfig) -> IndexInfo:
    """Ensure the index of `cfg.retriever` over `cfg.data.corpus` exists and print a summary."""
    corpus = cfg.data.get("corpus")
    if corpus and not any(True for _ in read_corpus(corpus)):  # stops at the first passage
        raise DataError(corpus, "the corpus holds no passage: data.corpus needs one {id, contents} object a line")
    info = ensure_index(cfg.retriever, corpus, show_progress=cfg.get("show_progress", True))
    print(f"index: {info.path}")
    print(f"backend: {info.backend}")
    print(f"passages: {info.doc_count if info.doc_count is not None else 'unknown (prebuilt Lucene index)'}")
    if info.reused:
        print("build: reused (already built)")
    else:
        print(f"build: {info.build_seconds:.1f} s")
    return info


@hydra.main(version_base=None, config_path=CONF_DIR, config_name="index")
def main(cfg: DictConfig) -> None:
    with user_errors_reported():
        run(cfg)


register_resolvers()

if __name__ == "__main__":
    main()
