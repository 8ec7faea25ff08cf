"""Rewrite conversations with a trained rewriter: turns in, one rewrite per line out; no retriever, no gold passages.

    python -m cqr_lightning.rewrite model.adapter=runs/X/rl/adapter input=turns.jsonl output=rewrites.jsonl

`input` is a JSONL file of turns in the project's format (README "Data format"); `positives` may be missing or
empty. Each output line holds `id`, `question`, `rewrite` (the model's rewrite, or the question when it wrote none)
and `query` (what would be searched under the search plan; several queries joined by ' || '), plus `response` and
`format_ok` for a model, and `samples` (the further sampled rewrites) with `rewriter.num_samples` > 1. With several
queries (not under fusion), `bm25_query` is the one query text that any BM25 engine (Lucene, Elasticsearch, bm25s)
ranks as the plan's summed scores: the queries joined by spaces. The
adapter's `cqr_rewriter.json` gives the base model, prompt, search plan and how many rewrites to sample; keys set
on the command line win. The output can be scored later with `evaluate rewriter=file rewriter.path=OUTPUT`.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterable, Sequence
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from cqr_lightning.config import CONF_DIR, register_resolvers
from cqr_lightning.errors import DataError, user_errors_reported
from cqr_lightning.evaluate import build_rewriter, rewrite_all
from cqr_lightning.io_utils import write_jsonl
from cqr_lightning.readers import read_jsonl_turns
from cqr_lightning.records import Turn
from cqr_lightning.rewriter_card import hydra_command_line_keys, with_adapter_card
from cqr_lightning.rewriters import Rewrite
from cqr_lightning.search import SearchPlan

log = logging.getLogger(__name__)


def read_input_turns(path: str | Path, limit: int | None = None) -> list[Turn]:
    """The turns to rewrite (positives optional), ids unique; the first `limit` only when given."""
    turns = read_jsonl_turns(path, positives_optional=True)
    turns = list(itertools.islice(turns, limit) if limit else turns)
    seen: set[str] = set()
    for turn in turns:
        if turn.id in seen:
            raise DataError(path, f"turn id '{turn.id}' appears more than once: every turn needs its own id")
        seen.add(turn.id)
    if not turns:
        raise DataError(path, "no turns to rewrite")
    return turns


def rewrite_rows(turns: Sequence[Turn], rewrites: Sequence[Rewrite], plan: SearchPlan) -> Iterable[dict]:
    """One output row per turn: its rewrite and what the plan would search for it."""
    for turn, rewrite in zip(turns, rewrites, strict=True):
        row = {
            "id": turn.id,
            "question": turn.question,
            "rewrite": rewrite.query,
            "query": plan.describe(turn, rewrite.searched),
        }
        joined = plan.single_query(turn, rewrite.searched)
        if joined is not None and joined != row["query"]:  # several queries whose summed BM25 scores it reproduces
            row["bm25_query"] = joined
        if rewrite.samples:
            row["samples"] = list(rewrite.samples)
        if rewrite.response is not None:
            row.update(response=rewrite.response, format_ok=rewrite.format_ok)
        yield row


def run_rewrite(cfg: DictConfig) -> Path:
    turns = read_input_turns(cfg.input, cfg.get("limit"))
    plan = SearchPlan.from_config(cfg.get("search"))
    rewriter = build_rewriter(cfg)
    rewrites = rewrite_all(rewriter, turns, int(cfg.rewriter.get("batch_size", 8)))
    output = Path(cfg.output)
    write_jsonl(output, rewrite_rows(turns, rewrites, plan))
    print(f"wrote {len(turns)} rewrites to {output}")
    return output


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="rewrite")
def main(cfg: DictConfig) -> None:
    with user_errors_reported():
        if cfg.rewriter.name == "model":  # the adapter is used as it was trained, unless the command line says so
            cfg = with_adapter_card(cfg, hydra_command_line_keys())
        log.debug("config:\n%s", OmegaConf.to_yaml(cfg))
        run_rewrite(cfg)


register_resolvers()

if __name__ == "__main__":
    main()
