"""How the MLflow runs of one `train.py` call hang together, and how they end.

A pipeline (`stage=pipeline`) has one parent run, tagged `stage=pipeline` and `run_dir`, holding the resolved
config (`config.yaml`) and the final table (`eval/summary.json`); the warm-up, RL and every evaluation are runs
nested under it (MLflow's `mlflow.parentRunId` tag), each tagged with its `stage` and the `run_dir`. The parent's id
is kept in `<run_dir>/mlflow_parent.json`, so rerunning the command resumes the same parent run; the stages resume
their own runs from the id stored in their checkpoints.

Every run this process starts or resumes is ended with the status MLflow users expect: FINISHED when the call
succeeds, FAILED when it raises (an error, a bad setting), KILLED when it is stopped by SIGTERM or Ctrl-C. A resumed
run is set back to RUNNING, so a stopped run that is continued ends FINISHED like any other.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from cqr_lightning.distributed import is_main_process
from cqr_lightning.io_utils import atomic_file

log = logging.getLogger(__name__)

PARENT_FILE = "mlflow_parent.json"
PARENT_RUN_TAG = "mlflow.parentRunId"
RUNNING, FINISHED, FAILED, KILLED = "RUNNING", "FINISHED", "FAILED", "KILLED"

_opened: dict[str, str] = {}  # run id -> tracking URI: the runs this process started or resumed


def client(cfg: DictConfig):
    import mlflow

    from cqr_lightning.tracking import ensure_experiment, tracking_uri

    ensure_experiment(cfg.logger)
    return mlflow.MlflowClient(tracking_uri=tracking_uri(cfg.logger))


def note_run(cfg: DictConfig, run_id: str, resumed: bool) -> None:
    """Remember a run started or resumed by this process (to end it), setting a resumed one back to RUNNING."""
    if not is_main_process():
        return
    if resumed:
        client(cfg).update_run(run_id, status=RUNNING)
    _opened[run_id] = str(cfg.logger.tracking_uri)


def parent_run_id(cfg: DictConfig, run_dir: Path) -> str | None:
    """The pipeline's parent run recorded in the run folder, when it lives in the configured tracking store."""
    path = Path(run_dir) / PARENT_FILE
    if not cfg.logger.enabled or not path.is_file():
        return None
    recorded = json.loads(path.read_text(encoding="utf-8"))
    return recorded["run_id"] if recorded.get("tracking_uri") == str(cfg.logger.tracking_uri) else None


def stage_tags(cfg: DictConfig, run_dir: Path, stage: str) -> dict[str, str]:
    """Tags of a stage's run: its stage and run folder, and the pipeline's parent run when there is one."""
    tags = {"stage": stage, "run_dir": str(Path(run_dir).resolve())}
    parent = parent_run_id(cfg, run_dir)
    if parent is not None:
        tags[PARENT_RUN_TAG] = parent
    return tags


def open_parent_run(cfg: DictConfig, run_dir: Path) -> str:
    """Start the pipeline's parent run, or resume the one recorded in the run folder; log the resolved config."""
    mlflow_client = client(cfg)
    run_id = parent_run_id(cfg, run_dir)
    if run_id is not None and not _usable(mlflow_client, run_id):
        log.warning("the parent MLflow run %s recorded in %s is gone: starting a new one", run_id, run_dir)
        run_id = None
    if run_id is None:
        experiment = mlflow_client.get_experiment_by_name(cfg.logger.experiment_name)
        name = cfg.logger.get("run_name") or f"pipeline-{Path(run_dir).name}"
        tags = {"stage": "pipeline", "run_dir": str(Path(run_dir).resolve())}
        run_id = mlflow_client.create_run(experiment.experiment_id, run_name=name, tags=tags).info.run_id
        from cqr_lightning.tracking import flatten_params

        params = _params(flatten_params(cfg))
        for start in range(0, len(params), 100):  # MLflow takes at most 100 params a call
            mlflow_client.log_batch(run_id, params=params[start : start + 100])
        with atomic_file(Path(run_dir) / PARENT_FILE) as handle:
            json.dump({"run_id": run_id, "tracking_uri": str(cfg.logger.tracking_uri)}, handle)
        note_run(cfg, run_id, resumed=False)
    else:
        note_run(cfg, run_id, resumed=True)
    mlflow_client.log_text(run_id, OmegaConf.to_yaml(cfg, resolve=True), "config.yaml")
    return run_id


def log_to_parent(cfg: DictConfig, run_dir: Path, path: Path, artifact_path: str | None = None) -> None:
    """Log a file (the final table) to the pipeline's parent run, if there is one."""
    run_id = parent_run_id(cfg, run_dir)
    if run_id is not None:
        client(cfg).log_artifact(run_id, str(path), artifact_path=artifact_path)


@contextmanager
def tracked_runs(cfg: DictConfig, run_dir: Path, pipeline: bool) -> Iterator[None]:
    """Open the parent run for a pipeline; when the block ends, end every run it started or resumed:
    FINISHED on success, KILLED on SIGTERM or Ctrl-C, FAILED on any other exception."""
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    if not cfg.logger.enabled or not is_main_process():  # other ranks of a multi-GPU run log nothing
        yield
        return
    from cqr_lightning.tracking import check_tracking_server

    check_tracking_server(cfg.logger)  # at once, not after MLflow's minutes of retries
    _opened.clear()
    if pipeline:
        open_parent_run(cfg, run_dir)
    try:
        yield
    except (SIGTERMException, KeyboardInterrupt):
        end_opened_runs(KILLED)
        raise
    except BaseException:
        end_opened_runs(FAILED)
        raise
    end_opened_runs(FINISHED)


def end_opened_runs(status: str) -> None:
    """Set the runs of this process that did not finish to `status` (a run that FINISHED stays so)."""
    import mlflow

    for run_id, uri in reversed(list(_opened.items())):
        mlflow_client = mlflow.MlflowClient(tracking_uri=uri)
        try:
            current = mlflow_client.get_run(run_id).info.status
            if current != FINISHED or status == FINISHED:
                mlflow_client.set_terminated(run_id, status)
        except Exception as error:  # a tracking server that went away must not hide the original error
            log.warning("could not mark MLflow run %s %s: %s", run_id, status, error)
    _opened.clear()


def _usable(mlflow_client, run_id: str) -> bool:
    from mlflow.exceptions import MlflowException

    try:
        return mlflow_client.get_run(run_id).info.lifecycle_stage == "active"
    except MlflowException:
        return False


def _params(flat: dict[str, str]):
    from mlflow.entities import Param

    return [Param(key, value) for key, value in flat.items()]
