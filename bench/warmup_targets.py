"""What a warm-up's SFT data teaches: of the kept examples, how many sit on later turns the question alone already
solves (a gold passage first, searched as asked), and how many of those copy the question rather than paraphrase it.

    python bench/warmup_targets.py RUN_DIR/warmup/distilled.jsonl [...] -- experiment=pack_smollm2 [key=value ...]

The overrides after `--` compose the run's configuration (data, holdout, retriever, search), as `train.py` would.
"""

from __future__ import annotations

import json
import sys
from collections import Counter

from cqr_lightning.config import compose_train_config
from cqr_lightning.formatting import is_copy
from cqr_lightning.readers import iter_jsonl_objects, turn_reader
from cqr_lightning.retrieval.factory import open_retriever
from cqr_lightning.scoring import RetrievalScorer
from cqr_lightning.search import SearchPlan


def describe(path: str, turns: dict, solved: set[str]) -> dict[str, int]:
    counts: Counter = Counter()
    for _, row in iter_jsonl_objects(path):
        turn = turns[row["turn_id"]]
        if not turn.history:
            counts["first_turns"] += 1
        elif turn.id in solved:
            counts["solved_copies" if is_copy(row["rewrite"], turn.question) else "solved_rewrites"] += 1
        else:
            counts["unsolved"] += 1
    return {"kept": sum(counts.values()), **counts}


def main(argv: list[str]) -> None:
    split = argv.index("--") if "--" in argv else len(argv)
    paths, overrides = argv[:split], argv[split + 1 :]
    cfg = compose_train_config(overrides)
    turns = {turn.id: turn for turn in turn_reader(cfg.data, cfg.data.train_split)()}
    later = [turn for turn in turns.values() if turn.history]
    with open_retriever(cfg.retriever, cfg.data.corpus, show_progress=False) as retriever:
        ranks = RetrievalScorer(retriever, SearchPlan.from_config(cfg.search)).question_ranks(later)
    solved = {turn.id for turn, rank in zip(later, ranks, strict=True) if rank == 1}
    print(json.dumps({"training_turns": len(turns), "later_turns": len(later), "solved_by_question": len(solved)}))
    for path in paths:
        print(json.dumps({"file": path, **describe(path, turns, solved)}))


if __name__ == "__main__":
    main(sys.argv[1:])
