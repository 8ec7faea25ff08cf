"""MLflow steps, flushes and run statuses, on a real sqlite store with a small Lightning model."""

from __future__ import annotations

import lightning as L
import mlflow
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import OmegaConf

from callbacks.mlflow_steps import MLflowStepsCallback
from cqr_lightning.mlflow_logger import StepAlignedMLFlowLogger
from cqr_lightning.mlflow_runs import tracked_runs


class LinearModule(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)

    def training_step(self, batch, batch_idx):
        loss = self.layer(batch).pow(2).mean()
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class CrashAfterCheckpoint(ModelCheckpoint):
    """Stands for a kill -9 right after the checkpoint of `crash_at` is written."""

    def __init__(self, crash_at: int | None, **kwargs):
        super().__init__(**kwargs)
        self.crash_at = crash_at

    def _save_checkpoint(self, trainer, filepath: str) -> None:
        super()._save_checkpoint(trainer, filepath)
        if trainer.global_step == self.crash_at and filepath.endswith("last.ckpt"):
            raise RuntimeError("killed")


def fit(tmp_path, logger, max_steps: int, ckpt_path=None, crash_at: int | None = None):
    torch.manual_seed(0)
    checkpoints = CrashAfterCheckpoint(crash_at, dirpath=tmp_path / "ckpt", every_n_train_steps=1, save_last=True)
    callbacks = [MLflowStepsCallback(), checkpoints]
    trainer = L.Trainer(
        max_steps=max_steps, logger=logger, callbacks=callbacks, log_every_n_steps=1, accelerator="cpu",
        enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    data = torch.utils.data.DataLoader(torch.randn(16, 2), batch_size=2)
    trainer.fit(LinearModule(), data, ckpt_path=ckpt_path)


def test_each_step_reaches_mlflow_once_at_the_checkpoint_steps_across_a_crash_and_resume(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    logger = StepAlignedMLFlowLogger(experiment_name="steps", tracking_uri=uri)
    with pytest.raises(RuntimeError, match="killed"):
        fit(tmp_path, logger, max_steps=6, crash_at=3)
    client = mlflow.MlflowClient(uri)
    run_id = logger.run_id
    assert torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)["global_step"] == 3
    # the point of the checkpointed step was sent before the checkpoint: nothing is lost
    assert [m.step for m in client.get_metric_history(run_id, "train/loss")] == [1, 2, 3]

    resumed = StepAlignedMLFlowLogger(experiment_name="steps", tracking_uri=uri, run_id=run_id)
    client.log_metric(run_id, "train/loss", 0.5, step=4)  # as if step 4 had been logged before a kill -9
    fit(tmp_path, resumed, max_steps=6, ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    steps = [m.step for m in client.get_metric_history(run_id, "train/loss")]
    assert sorted(steps) == [1, 2, 3, 4, 5, 6], "a resumed run logs no step twice"


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


def free_port() -> int:
    """A local port nothing listens on (bound, then released)."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def serving(status: int):
    """A real HTTP server on a free local port answering every GET with `status`; the caller shuts it down."""
    import threading
    from http.server import BaseHTTPRequestHandler, HTTPServer

    class Answer(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(status)
            self.end_headers()
            self.wfile.write(b"OK")

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Answer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def test_an_unreachable_tracking_server_stops_at_once_naming_the_setting(tmp_path):
    import time

    from cqr_lightning.errors import ConfigError
    from cqr_lightning.mlflow_runs import PARENT_FILE

    uri = f"http://127.0.0.1:{free_port()}"
    cfg = OmegaConf.create({"logger": {"enabled": True, "tracking_uri": uri, "experiment_name": "x"}})
    started = time.monotonic()
    with pytest.raises(ConfigError, match=rf"logger.tracking_uri={uri}: no MLflow tracking server answers there"):
        with tracked_runs(cfg, tmp_path, pipeline=True):
            pytest.fail("the run started without a tracking server")
    assert time.monotonic() - started < 30, "not after MLflow's minutes of retries"
    assert not (tmp_path / PARENT_FILE).exists()


@pytest.mark.parametrize("status", [200, 404, 401])
def test_any_http_answer_counts_as_a_reachable_tracking_server(status):
    from cqr_lightning.tracking import check_tracking_server

    server = serving(status)
    try:
        check_tracking_server(OmegaConf.create({"tracking_uri": f"http://127.0.0.1:{server.server_port}/"}))
    finally:
        server.shutdown()
    check_tracking_server(OmegaConf.create({"tracking_uri": "sqlite:///nowhere/m.db"}))  # local stores: no probe


def test_evaluation_checks_its_tracking_server_before_any_model_loads(fixture_data_dir, tmp_path):
    from test_evaluate import evaluate_cfg

    from cqr_lightning.errors import ConfigError
    from cqr_lightning.preflight import check_evaluation_inputs

    uri = f"http://127.0.0.1:{free_port()}"
    cfg = evaluate_cfg(fixture_data_dir, tmp_path, tmp_path / "m.db", f"logger.tracking_uri={uri}")
    assert cfg.logger.enabled
    with pytest.raises(ConfigError, match="logger.tracking_uri"):
        check_evaluation_inputs(cfg)
