"""Evaluate a way of rewriting conversational questions against a retriever.

    python -m cqr_lightning.evaluate data=jsonl data.dir=../shared/data/convsearch-pack \
        data.eval_split=dev retriever=bm25s rewriter=raw output_dir=OUT

Prints a table, writes `<output_dir>/metrics.json`, `<output_dir>/groups.json` (the same metrics within first turns,
later turns and each `source`), `<output_dir>/rewrites.jsonl` (query, best gold rank,
metrics per turn), `<output_dir>/run.trec` and `qrels.trec` (TREC run and qrels: trec_eval on them gives
metrics.json's figures) and `<output_dir>/config.yaml` (the settings as run) and logs params, metrics and the files
to MLflow. With `rewriter=model model.adapter=PATH`, the settings recorded in `PATH/cqr_rewriter.json` (base model,
response format, prompt budgets, search plan) replace the config's; keys given on the command line win.
"""

from __future__ import annotations

import itertools
import logging
import time
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from cqr_lightning.config import CONF_DIR, own_job_folder, register_resolvers
from cqr_lightning.errors import DataError, user_errors_reported
from cqr_lightning.evaluation import TurnResult, format_table, score_turns, summarize, summarize_groups
from cqr_lightning.io_utils import write_json, write_jsonl
from cqr_lightning.preflight import check_evaluation_inputs
from cqr_lightning.readers import split_path, turn_reader
from cqr_lightning.records import Turn
from cqr_lightning.rewriter_card import hydra_command_line_keys, with_adapter_card
from cqr_lightning.rewriters import (
    FileRewriter,
    HistoryRewriter,
    HumanRewriter,
    ModelRewriter,
    RawRewriter,
    check_sampling,
)
from cqr_lightning.search import SearchPlan
from cqr_lightning.trec import qrels_lines, run_lines, write_lines

log = logging.getLogger(__name__)


def load_turns(cfg: DictConfig, split: str) -> list[Turn]:
    from data_modules.conversations import read_corpus_ids

    known_ids = read_corpus_ids(cfg.data.corpus) if cfg.data.get("check_positives", True) else None
    turns = turn_reader(cfg.data, split, known_ids)()
    return list(itertools.islice(turns, cfg.limit) if cfg.get("limit") else turns)


def check_judged(turns: list[Turn], path: Path) -> None:
    """Stop when no turn has a gold passage (the metrics would be 0 over n=0); warn when some have none."""
    unjudged = sum(not turn.positives for turn in turns)
    if unjudged == len(turns):
        raise DataError(
            path,
            f"none of the {len(turns)} turns has a positive passage, so there is nothing to score; to rewrite "
            f"turns without gold passages, use `python -m cqr_lightning.rewrite model.adapter=ADAPTER input={path}`",
        )
    if unjudged:
        log.warning(
            "%d of %d turns have no positive passage: the metrics average the other %d",
            unjudged,
            len(turns),
            len(turns) - unjudged,
        )


def build_rewriter(cfg: DictConfig):
    name = cfg.rewriter.name
    if name == "raw":
        return RawRewriter()
    if name == "history":
        return HistoryRewriter(cfg.rewriter.roles)
    if name == "human":
        return HumanRewriter()
    if name == "file":
        return FileRewriter(cfg.rewriter.path)
    if name == "model":
        from cqr_lightning.models.loading import load_policy, load_tokenizer

        num_samples = int(cfg.rewriter.get("num_samples", 1))  # a config saved before the setting has none
        temperature = float(cfg.rewriter.get("temperature", 1.0))
        check_sampling(num_samples, temperature)  # before the model loads
        tokenizer = load_tokenizer(cfg.model)
        model = load_policy(cfg.model, adapter=cfg.model.get("adapter"), trainable=False)
        return ModelRewriter(
            model,
            tokenizer,
            max_prompt_length=cfg.model.max_prompt_length,
            max_new_tokens=cfg.rewriter.max_new_tokens,
            batch_size=cfg.rewriter.batch_size,
            response_format=cfg.rewriter.response_format,
            few_shot=cfg.rewriter.few_shot,
            prefill=cfg.rewriter.get("prefill_response", False),
            lenient=cfg.rewriter.get("lenient_format", False),
            num_samples=num_samples,
            temperature=temperature,
            seed=int(cfg.get("seed", 0)),
            shared_prefill=bool(cfg.rewriter.get("shared_prefill", False)),
        )
    raise ValueError(f"unknown rewriter '{name}': use raw, history, human, file or model")


def rewrite_all(rewriter, turns: list[Turn], batch_size: int):
    from tqdm.auto import tqdm

    rewrites = []
    with tqdm(total=len(turns), desc="rewriting", unit="turn") as bar:
        for start in range(0, len(turns), batch_size):
            rewrites.extend(rewriter(turns[start : start + batch_size]))
            bar.update(min(batch_size, len(turns) - start))
    return rewrites


def run_evaluation(cfg: DictConfig) -> dict[str, float]:
    from cqr_lightning.retrieval.factory import open_retriever

    check_evaluation_inputs(cfg)  # settings, corpus and split, before any model loads (cqr_lightning/preflight.py)
    output_dir = Path(cfg.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    turns = load_turns(cfg, cfg.data.eval_split)
    if not turns:
        raise ValueError(f"no turns to evaluate in split '{cfg.data.eval_split}' of {cfg.data.dir}")
    check_judged(turns, split_path(cfg.data, cfg.data.eval_split))
    started = time.perf_counter()
    rewriter = build_rewriter(cfg)
    rewrites = rewrite_all(rewriter, turns, int(cfg.rewriter.get("batch_size", 256)))
    plan = SearchPlan.from_config(cfg.get("search"))
    queries = [r.searched for r in rewrites]  # the retriever cuts them to retriever.max_query_words
    with open_retriever(cfg.retriever, cfg.data.corpus) as retriever:
        results = score_turns(turns, queries, retriever, plan, k=int(cfg.retriever.get("k", 100)))
    for result, rewrite in zip(results, rewrites, strict=True):
        result.response, result.format_ok = rewrite.response, rewrite.format_ok
    metrics = summarize(results)
    if rewrites and rewrites[0].format_ok is not None:
        metrics["format_ok"] = sum(bool(r.format_ok) for r in rewrites) / len(rewrites)
    # the share of turns searched with the question as asked (first turns, copies, missing rewrites)
    metrics["copy_rate"] = sum(r.as_asked for r in results) / len(results)
    metrics["query_mode"] = plan.query_mode
    metrics["rewrites_per_turn"] = 1 + max((len(r.samples) for r in rewrites), default=0)
    metrics["seconds"] = time.perf_counter() - started
    write_json(output_dir / "metrics.json", metrics)
    groups = summarize_groups(turns, results)
    write_json(output_dir / "groups.json", groups)
    OmegaConf.save(cfg, output_dir / "config.yaml", resolve=True)  # as run, adapter settings included
    write_jsonl(output_dir / "rewrites.jsonl", (r.to_json() for r in results))
    tag = f"cqr_{cfg.rewriter.name}_{plan.query_mode}"
    write_lines(output_dir / "run.trec", run_lines(((r.turn_id, r.top_ids, r.top_scores) for r in results), tag))
    write_lines(output_dir / "qrels.trec", qrels_lines(turns))
    label = f"{cfg.rewriter.name} / {cfg.retriever.name} / {plan.query_mode} / {cfg.data.eval_split}"
    print(format_table({label: metrics}))
    print(format_table({f"  {name}": row for name, row in groups.items()}))
    print(f"wrote metrics.json, groups.json, rewrites.jsonl, run.trec and qrels.trec to {output_dir}")
    if cfg.logger.enabled:
        log_to_mlflow(cfg, metrics, results, output_dir)
    return metrics


def log_to_mlflow(cfg: DictConfig, metrics: dict, results: list[TurnResult], output_dir: Path) -> None:
    import mlflow

    from cqr_lightning.tracking import ensure_experiment, flatten_params, metric_key

    experiment_id = ensure_experiment(cfg.logger)
    run_name = cfg.logger.get("run_name") or f"evaluate-{cfg.rewriter.name}-{cfg.retriever.name}"
    tags = OmegaConf.to_container(cfg.logger.tags, resolve=True) if cfg.logger.get("tags") else {"stage": "evaluate"}
    with mlflow.start_run(experiment_id=experiment_id, run_name=run_name, tags=tags) as run:
        mlflow.log_params(flatten_params(cfg))
        numeric = {k: float(v) for k, v in metrics.items() if isinstance(v, int | float)}
        mlflow.log_metrics({metric_key(f"eval/{k}"): v for k, v in numeric.items()})
        for name in ("metrics.json", "groups.json", "rewrites.jsonl", "run.trec", "qrels.trec"):
            mlflow.log_artifact(str(output_dir / name))
        log.info("MLflow run %s in %s", run.info.run_id, cfg.logger.tracking_uri)


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="evaluate")
def main(cfg: DictConfig) -> None:
    with user_errors_reported():
        cfg = own_job_folder(cfg, "output_dir")
        if cfg.rewriter.name == "model":  # an adapter is used as it was trained, unless the command line says so
            cfg = with_adapter_card(cfg, hydra_command_line_keys())
        log.debug("config:\n%s", OmegaConf.to_yaml(cfg))
        run_evaluation(cfg)


register_resolvers()

if __name__ == "__main__":
    main()
