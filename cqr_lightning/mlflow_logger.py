"""Lightning's MLFlowLogger, logging at the steps of `curves.csv` and never twice at one step.

Lightning hands loggers its count of finished optimizer steps, which during `fit` lags `trainer.global_step` by
one (the step is counted after the metrics are sent), while `curves.csv` and the plots use `global_step`. Bound
to a trainer (callbacks/mlflow_steps.py does it), this logger uses `global_step`, so a metric of step N is step N
everywhere.

A metric key is logged at most once per step: a point whose step is not past the last one logged for that key is
dropped. That makes an early flush (before a checkpoint is written) safe to repeat, and a resumed run, which
redoes the steps after its checkpoint, adds no duplicate of the points it logged before the interruption.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from lightning.pytorch.loggers import MLFlowLogger
from lightning.pytorch.utilities import rank_zero_only


def mlflow_key(name: str) -> str:
    """The key MLFlowLogger stores for a metric name (it drops the characters MLflow refuses)."""
    return re.sub("[^a-zA-Z0-9_/. -]+", "", name)


class StepAlignedMLFlowLogger(MLFlowLogger):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.trainer = None  # when bound, metrics are logged at trainer.global_step
        self._resumed = kwargs.get("run_id") is not None
        self._last_steps: dict[str, int] | None = None  # key -> last step logged

    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        if self.trainer is not None:
            step = self.trainer.global_step
        step = step or 0
        last_steps = self.last_steps()
        fresh = {k: v for k, v in metrics.items() if step > last_steps.get(mlflow_key(k), -1)}
        if not fresh:
            return
        super().log_metrics(fresh, step)
        for key in fresh:
            last_steps[mlflow_key(key)] = step

    def last_steps(self) -> dict[str, int]:
        """The last step of every metric already in the run (read once from MLflow for a resumed run)."""
        if self._last_steps is None:
            self._last_steps = logged_steps(self.experiment, self.run_id) if self._resumed else {}
        return self._last_steps


def logged_steps(client, run_id: str) -> dict[str, int]:
    keys = client.get_run(run_id).data.metrics
    return {key: max(m.step for m in client.get_metric_history(run_id, key)) for key in keys}


def open_mlflow_logger(
    experiment_name: str,
    tracking_uri: str,
    artifact_location: str | None = None,
    run_name: str | None = None,
    run_id: str | None = None,
    tags: dict | None = None,
) -> StepAlignedMLFlowLogger:
    """A StepAlignedMLFlowLogger in `experiment_name`, created first when new, with its artifacts at
    `artifact_location` (a local path is made absolute); a local sqlite store's folder is created
    (cqr_lightning/tracking.py). `conf/logger/mlflow.yaml` names it with `_target_`."""
    from omegaconf import OmegaConf

    from cqr_lightning import tracking

    settings = OmegaConf.create(
        {"experiment_name": experiment_name, "tracking_uri": tracking_uri, "artifact_location": artifact_location}
    )
    tracking.ensure_experiment(settings)
    return StepAlignedMLFlowLogger(
        experiment_name=experiment_name,
        run_name=run_name,
        tracking_uri=tracking.tracking_uri(settings),
        artifact_location=tracking.artifact_location(settings),
        run_id=run_id,
        tags=tags,
    )
