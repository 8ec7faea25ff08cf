"""What observes a training stage, built from config with `hydra.utils.instantiate` (cqr_lightning/targets.py): the
MLflow logger (`logger` group) and the stage's callbacks (`callbacks.<stage>` entries of the `callbacks` group).

A key of `conf/logger/mlflow.yaml` is an argument of its `_target_`, except `enabled`, which evaluation and the
pipeline's parent run read too; the run names the stage's MLflow run (unless `logger.run_name` is set), tags it, and
passes the run id of the checkpoint it resumes. A callback entry's keys are constructor arguments; the run passes
the stage folder, the tokenizer and the rewriter card to a callback whose constructor takes them
(`CALLBACK_RUN_ARGUMENTS`). Callbacks that a run needs to be correct (checkpointing, StopOnSigterm,
ValidationOnResume, StreamPositionCallback, in cqr_lightning/run_control/) are not here: the stages add them
themselves (cqr_lightning/stages.py).
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from cqr_lightning.targets import build_entry, check_entry

LOGGER_KEYS = ("enabled",)  # read by evaluation and the parent run as well; not an argument
LOGGER_RUN_ARGUMENTS = {
    "run_id": "resume or ckpt_path (a resumed stage logs into its checkpoint's run)",
    "tags": "the run's own tags (stage, run folder, parent run)",
}
CALLBACK_RUN_ARGUMENTS = {
    "dirpath": "run_dir (a callback writes into its stage's folder)",
    "tokenizer": "model",
    "card": "model and the stage's max_new_tokens (the rewriter card)",
}


def check_logger_settings(cfg: DictConfig) -> None:
    """ConfigError naming the first key of an enabled `logger` group that its `_target_` does not take."""
    if cfg.logger.get("enabled"):
        check_entry("logger", cfg.logger, LOGGER_RUN_ARGUMENTS, LOGGER_KEYS)


def build_logger(cfg: DictConfig, stage: str, run_dir: Path, run_id: str | None = None):
    """The stage's MLflow logger (None when logging is off): a run tagged with the stage and run folder, nested under
    the pipeline's parent run (cqr_lightning/mlflow_runs.py), or the run `run_id` when resuming; params are the
    resolved config."""
    if not cfg.logger.get("enabled"):
        return None
    from cqr_lightning.mlflow_runs import note_run, stage_tags
    from cqr_lightning.tracking import flatten_params

    logger = build_entry(
        "logger",
        cfg.logger,
        LOGGER_RUN_ARGUMENTS,
        LOGGER_KEYS,
        run_name=cfg.logger.get("run_name") or f"{stage}-{run_dir.name}",
        run_id=run_id,
        tags=None if run_id else stage_tags(cfg, run_dir, stage),
    )
    if run_id is None:
        logger.log_hyperparams(flatten_params(cfg))
    note_run(cfg, logger.run_id, resumed=run_id is not None)
    return logger


def stage_callback_entries(cfg: DictConfig, stage: str) -> dict[str, DictConfig]:
    """The `callbacks.<stage>` entries by name; an entry set to null is left out."""
    entries = (cfg.get("callbacks") or {}).get(stage) or {}
    return {str(name): entry for name, entry in entries.items() if entry is not None}


def check_callback_settings(cfg: DictConfig, stage: str) -> None:
    """ConfigError naming the first key of a `callbacks.<stage>` entry that its `_target_` does not take."""
    for name, entry in stage_callback_entries(cfg, stage).items():
        check_entry(f"callbacks.{stage}.{name}", entry, CALLBACK_RUN_ARGUMENTS)


def build_callbacks(cfg: DictConfig, stage: str, **run_arguments) -> list:
    """The stage's observing callbacks, in the order of `callbacks.<stage>`, each given the `run_arguments`
    (dirpath, tokenizer, card) its constructor takes."""
    return [
        build_entry(f"callbacks.{stage}.{name}", entry, CALLBACK_RUN_ARGUMENTS, **run_arguments)
        for name, entry in stage_callback_entries(cfg, stage).items()
    ]
