"""A user's mistake ends a command with its message alone (exit code 2, no traceback); a bug keeps its traceback."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf
from test_train_e2e import tiny_overrides

from cqr_lightning.config import register_resolvers
from cqr_lightning.errors import USER_ERROR_EXIT_CODE, ConfigError, DataError, user_error, user_errors_reported

ROOT = Path(__file__).resolve().parent.parent


def test_the_project_errors_are_found_behind_omegaconf_wrappers():
    register_resolvers()
    with pytest.raises(Exception) as caught:  # data=jsonl without data.dir: the resolver's ConfigError, wrapped
        OmegaConf.create({"dir": "${data_dir_required:}"}).dir  # noqa: B018
    assert type(caught.value) is not ConfigError
    assert isinstance(user_error(caught.value), ConfigError)
    data = DataError("train.jsonl", "bad", 3)
    assert user_error(data) is data
    full = OSError(errno.ENOSPC, "No space left on device")
    assert user_error(full) is full


def test_a_bug_is_not_taken_for_a_user_error():
    assert user_error(RuntimeError("a bug")) is None
    assert user_error(OSError(errno.EACCES, "Permission denied")) is None
    try:
        try:
            raise DataError("dev.jsonl", "bad", 1)
        except DataError:
            raise KeyError("raised while handling it") from None
    except KeyError as error:
        assert user_error(error) is None


def test_user_errors_reported_prints_the_message_and_exits_2(capsys, monkeypatch):
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    with pytest.raises(SystemExit) as stopped, user_errors_reported():
        raise ConfigError("rl.lr=-1 must be a positive number")
    assert stopped.value.code == USER_ERROR_EXIT_CODE
    assert capsys.readouterr().err == "Error: rl.lr=-1 must be a positive number\n"
    with pytest.raises(SystemExit), user_errors_reported():
        raise OSError(errno.ENOSPC, "No space left on device", "/runs/metrics.json")
    assert "No space left on device: '/runs/metrics.json'; free some space" in capsys.readouterr().err
    with pytest.raises(RuntimeError), user_errors_reported():
        raise RuntimeError("a bug keeps its traceback")
    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")
    with pytest.raises(ConfigError), user_errors_reported():
        raise ConfigError("shown with its traceback on request")


@pytest.mark.slow
def test_train_names_an_impossible_setting_without_a_traceback(fixture_data_dir, tmp_path):
    overrides = tiny_overrides(fixture_data_dir, tmp_path / "run", tmp_path / "mlflow.db")
    command = [sys.executable, "train.py", "stage=rl", *overrides, "rl.group_size=1"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("HYDRA_FULL_ERROR", None)
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == USER_ERROR_EXIT_CODE, done.stderr[-2000:]
    assert "Error: rl.group_size=1 must be at least 2" in done.stderr
    assert "Traceback" not in done.stderr + done.stdout
