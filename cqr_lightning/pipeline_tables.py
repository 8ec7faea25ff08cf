"""The comparison tables at the end of the pipeline: the raw question, the human rewrite and the model with each
adapter (untuned, after warm-up, after GRPO, best on validation, several sampled rewrites) on every evaluation
split; one folder per split and row under `<run_dir>/eval/`, all tables in `eval/summary.json`."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from cqr_lightning.io_utils import write_json
from cqr_lightning.preflight import evaluation_splits

log = logging.getLogger(__name__)


def evaluate_rewriters(
    cfg: DictConfig, run_dir: Path, adapters: dict[str, str | None], row_rewriter: dict[str, dict] | None = None
) -> dict[str, dict]:
    """Evaluate the raw question, the human rewrite and the model with each adapter on every evaluation split;
    one table per split in `<run_dir>/eval/<split>/`, all of them in `eval/summary.json` ({split: {row: metrics}}).
    `row_rewriter` gives some rows rewriter settings over `eval.rewriter` (e.g. several sampled rewrites)."""
    from cqr_lightning.evaluate import run_evaluation
    from cqr_lightning.evaluation import format_table
    from cqr_lightning.mlflow_runs import log_to_parent, stage_tags
    from cqr_lightning.rewriters import MissingHumanRewrites

    base = OmegaConf.to_container(cfg, resolve=True)
    jobs = [("raw question", {"rewriter": {"name": "raw"}})]
    if cfg.eval.get("human", False):
        jobs.append(("human rewrite", {"rewriter": {"name": "human"}}))
    for label, adapter in adapters.items():
        rewriter = {**base["eval"]["rewriter"], "name": "model"}
        if adapter is None:  # the untuned model is asked the way the warm-up samples it
            rewriter.update(base["eval"].get("untuned") or {})
        rewriter.update((row_rewriter or {}).get(label) or {})
        jobs.append((label, {"rewriter": rewriter, "model": {**base["model"], "adapter": adapter}}))
    tables: dict[str, dict] = {}
    for split in evaluation_splits(cfg):
        rows: dict[str, dict] = {}
        for label, overrides in jobs:
            output_dir = run_dir / "eval" / slug(split) / slug(label)
            job_cfg = OmegaConf.merge(base, overrides, {"output_dir": str(output_dir), "data": {"eval_split": split}})
            job_cfg.logger.run_name = f"evaluate-{slug(split)}-{slug(label)}-{run_dir.name}"
            job_cfg.logger.tags = {**stage_tags(cfg, run_dir, "evaluate"), "eval_split": split, "eval_row": label}
            try:
                rows[label] = run_evaluation(job_cfg)
            except MissingHumanRewrites as error:
                log.warning("no '%s' row on %s: %s", label, split, error)
        query_mode = next(iter(rows.values())).get("query_mode", "rewrite") if rows else "rewrite"
        log.info("%s (searched with query_mode=%s)\n%s", split, query_mode, format_table(rows))  # to train.log too
        tables[split] = rows
    write_json(run_dir / "eval" / "summary.json", tables)
    log_to_parent(cfg, run_dir, run_dir / "eval" / "summary.json", artifact_path="eval")
    return tables


def slug(label: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in label.lower()).strip("_")


BEST_ROW = "GRPO, best on validation"


def best_validated_adapter(stage_dir: Path) -> Path | None:
    """The stage's `best_adapter` (the step with the best validation metric, on `data.val_split`), or None with a
    warning when no validation ran."""
    record = stage_dir / "best_adapter.json"
    if not record.is_file():
        log.warning(
            "no '%s' row: %s has no best adapter (no validation ran; see rl.val_every_n_steps)", BEST_ROW, stage_dir
        )
        return None
    chosen = json.loads(record.read_text())
    log.info("'%s' row: the adapter of step %s (%s)", BEST_ROW, chosen.get("step"), chosen)
    return stage_dir / "best_adapter"


def pipeline_rows(
    cfg: DictConfig, warm: str | Path | None, trained: Path
) -> tuple[dict[str, str | None], dict[str, dict]]:
    """The rows the pipeline's tables compare, as the `eval` settings ask: {label: adapter (None: the untuned
    model)} and, for the sampled rows, {label: rewriter settings}."""
    adapters: dict[str, str | None] = {}
    if cfg.eval.get("untuned_row", True):
        adapters["untuned model"] = None
    if cfg.pipeline.warmup and cfg.eval.get("warmup_row", True):
        adapters["after warm-up"] = str(warm)
    adapters["after GRPO"] = str(trained)
    if cfg.eval.get("best_row", False):
        best = best_validated_adapter(trained.parent)
        if best is not None:
            adapters[BEST_ROW] = str(best)
    row_rewriter = {}
    for sampled in cfg.eval.get("sampled_rows") or []:  # {num_samples, temperature (default eval.rewriter's)}
        n, temperature = int(sampled.num_samples), float(sampled.get("temperature", cfg.eval.rewriter.temperature))
        label = f"after GRPO, {n} rewrites at T={temperature:g}"
        adapters[label] = str(trained)
        row_rewriter[label] = {"num_samples": n, "temperature": temperature}
    return adapters, row_rewriter
