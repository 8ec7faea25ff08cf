"""How many sampled rewrites a turn is worth: saved rewrites re-searched with only the greedy one and the first
N - 1 samples, for several N, without generating anything.

    python bench/rewrites_per_turn.py SPLIT REWRITES.jsonl[.gz] [...] [--n 1 2 4 8] -- experiment=pack_smollm2

Each file is an evaluation's rewrites.jsonl (gzipped or not) made with `rewriter.num_samples` > 1, so its rows hold
`samples`; the turns of SPLIT are read, and searched under `search`, as the overrides after `--` compose them (as
`train.py` would). Prints one JSON line per file and N with the split's mean metrics.
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
from pathlib import Path

from cqr_lightning.config import compose_train_config
from cqr_lightning.evaluation import score_turns, summarize
from cqr_lightning.readers import turn_reader
from cqr_lightning.retrieval.factory import open_retriever
from cqr_lightning.search import SearchPlan


def read_rows(path: Path) -> dict[str, dict]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        return {row["id"]: row for row in map(json.loads, f)}


def first_rewrites(row: dict, question: str, n: int) -> tuple[str, ...]:
    """The saved greedy rewrite (the question when there was none) and the first n - 1 samples."""
    return (row["rewrite"] or question, *row.get("samples", [])[: n - 1])


def main(argv: list[str]) -> None:
    split = argv.index("--") if "--" in argv else len(argv)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("split")
    parser.add_argument("files", nargs="+", type=Path)
    parser.add_argument("--n", nargs="+", type=int, default=[1, 2, 4, 8])
    args = parser.parse_args(argv[:split])
    cfg = compose_train_config(argv[split + 1 :])
    turns = list(turn_reader(cfg.data, args.split)())
    plan = SearchPlan.from_config(cfg.search)
    with open_retriever(cfg.retriever, cfg.data.corpus, show_progress=False) as retriever:
        for path in args.files:
            rows = read_rows(path)
            for n in args.n:
                rewrites = [first_rewrites(rows[turn.id], turn.question, n) for turn in turns]
                metrics = summarize(score_turns(turns, rewrites, retriever, plan))
                print(json.dumps({"file": str(path), "split": args.split, "rewrites": n, **metrics}))


if __name__ == "__main__":
    main(sys.argv[1:])
