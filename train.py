"""Train a conversational query rewriter: `python train.py [stage=pipeline|warmup|rl] [key=value ...]`.

See conf/train.yaml for every setting; `python train.py --cfg job --resolve` prints the resolved
config; with `--multirun` each job works in `<run_dir>/<job number>`.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import hydra
import lightning as L
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig

from cqr_lightning.config import CONF_DIR, own_job_folder, register_resolvers
from cqr_lightning.errors import ConfigError, user_errors_reported
from cqr_lightning.mlflow_runs import tracked_runs
from cqr_lightning.run_control.stop_on_sigterm import SIGTERM_EXIT_CODE
from cqr_lightning.run_settings import check_run_settings

log = logging.getLogger(__name__)
STAGES = ("pipeline", "warmup", "rl")


def run(cfg: DictConfig):
    from cqr_lightning import stages

    if cfg.stage not in STAGES:
        raise ConfigError(f"stage={cfg.stage} is not one of {', '.join(STAGES)}")
    L.seed_everything(cfg.seed, workers=True)
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    check_run_settings(cfg, run_dir)
    with tracked_runs(cfg, run_dir, pipeline=cfg.stage == "pipeline"):  # MLflow runs end FINISHED, FAILED or KILLED
        if cfg.stage == "warmup":
            return stages.run_warmup(cfg, run_dir)
        if cfg.stage == "rl":
            return stages.run_rl(cfg, run_dir, cfg.model.get("adapter"))
        return stages.run_pipeline(cfg, run_dir)


def launched_run_dir(cfg: DictConfig) -> None:
    """In a process that Lightning's DDP launcher started, use the main process's run folder: Lightning passes it
    as `hydra.run.dir`, while a default `run_dir` (a timestamp) would resolve to this process's start time."""
    from hydra.core.hydra_config import HydraConfig

    if int(os.environ.get("LOCAL_RANK", 0)) > 0 and HydraConfig.initialized():
        cfg.run_dir = HydraConfig.get().run.dir


register_resolvers()


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="train")
def main(cfg: DictConfig) -> None:
    cfg = own_job_folder(cfg, "run_dir")
    launched_run_dir(cfg)
    try:
        with user_errors_reported():
            result = run(cfg)
    except SIGTERMException:
        log.warning("stopped by SIGTERM; run the same command again (same run_dir) to resume")
        raise SystemExit(SIGTERM_EXIT_CODE) from None
    log.info("done: %s", result if not isinstance(result, dict) else Path(cfg.run_dir) / "eval" / "summary.json")


if __name__ == "__main__":
    main()
