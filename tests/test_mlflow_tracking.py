"""MLflow run statuses, on a real sqlite store with a small Lightning model."""

from __future__ import annotations

import mlflow
import pytest
from omegaconf import OmegaConf

from cqr_lightning.mlflow_runs import tracked_runs


def test_runs_of_a_failed_or_stopped_call_are_not_left_running(tmp_path):
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from cqr_lightning.mlflow_runs import PARENT_FILE, note_run

    cfg = OmegaConf.create(
        {"logger": {"enabled": True, "tracking_uri": f"sqlite:///{tmp_path / 'm.db'}", "experiment_name": "x"}}
    )
    client = mlflow.MlflowClient(cfg.logger.tracking_uri)

    def statuses() -> list[str]:
        experiment = client.get_experiment_by_name("x")
        return sorted(r.info.status for r in client.search_runs([experiment.experiment_id]))

    with pytest.raises(ValueError), tracked_runs(cfg, tmp_path, pipeline=True):
        child = client.create_run(client.get_experiment_by_name("x").experiment_id).info.run_id
        note_run(cfg, child, resumed=False)
        raise ValueError("a bad setting")
    assert statuses() == ["FAILED", "FAILED"]

    with pytest.raises(SIGTERMException), tracked_runs(cfg, tmp_path, pipeline=True):
        note_run(cfg, child, resumed=True)
        assert statuses() == ["RUNNING", "RUNNING"]  # the same parent and child, running again
        raise SIGTERMException(143)
    assert statuses() == ["KILLED", "KILLED"]

    with tracked_runs(cfg, tmp_path, pipeline=True):
        note_run(cfg, child, resumed=True)
    assert statuses() == ["FINISHED", "FINISHED"]
    assert (tmp_path / PARENT_FILE).is_file()
