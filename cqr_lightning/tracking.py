"""MLflow set-up shared by evaluation and training: a local sqlite store unless a URI is given."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from cqr_lightning.errors import ConfigError


def metric_key(name: str) -> str:
    """MLflow-safe metric name: `val/mrr@3` -> `val/mrr_at_3`."""
    return re.sub(r"[^0-9A-Za-z_\-./ ]", "_", name.replace("@", "_at_"))


def flatten_params(cfg: DictConfig | Mapping, prefix: str = "") -> dict[str, str]:
    """Resolved config as flat `a.b.c -> value` strings, MLflow's param form."""
    container = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
    flat: dict[str, str] = {}

    def walk(node, path: str) -> None:
        if isinstance(node, Mapping):
            for key, value in node.items():
                walk(value, f"{path}.{key}" if path else str(key))
        else:
            flat[path] = str(node)[:6000]

    walk(container, prefix)
    return flat


def check_tracking_server(logger_cfg, timeout: float = 5.0) -> None:
    """ConfigError naming `logger.tracking_uri` when it is an http(s) address where nothing answers: MLflow itself
    would retry for minutes and then fail with a traceback. Any HTTP answer (even an error status from a proxy or an
    authentication wall) counts as reachable and is left to MLflow; other URIs (sqlite, file, databricks) are not
    probed."""
    import urllib.error
    import urllib.request

    uri = str(logger_cfg.tracking_uri)
    if not uri.startswith(("http://", "https://")):
        return
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout):
            return
    except urllib.error.HTTPError:
        return  # a server answered
    except (urllib.error.URLError, OSError) as error:  # refused, unknown host, timed out
        reason = getattr(error, "reason", error)
        raise ConfigError(
            f"logger.tracking_uri={uri}: no MLflow tracking server answers there ({reason}). Start it (mlflow server "
            "...), point logger.tracking_uri at a running one, or log locally with "
            "logger.tracking_uri=sqlite:///mlruns/mlflow.db (logger=none turns logging off)"
        ) from None


def tracking_uri(logger_cfg) -> str:
    """The configured URI; for a local sqlite file its folder is created first."""
    uri = str(logger_cfg.tracking_uri)
    if uri.startswith("sqlite:///"):
        Path(uri.removeprefix("sqlite:///")).expanduser().parent.mkdir(parents=True, exist_ok=True)
    return uri


def artifact_location(logger_cfg) -> str | None:
    location = logger_cfg.get("artifact_location")
    if not location or "://" in str(location):
        return location
    return Path(location).expanduser().resolve().as_uri()


def ensure_experiment(logger_cfg) -> str:
    """Id of the configured experiment, created (with its artifact location) if needed."""
    import mlflow

    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    mlflow.set_tracking_uri(tracking_uri(logger_cfg))
    client = mlflow.MlflowClient()
    experiment = client.get_experiment_by_name(logger_cfg.experiment_name)
    if experiment is not None:
        return experiment.experiment_id
    return client.create_experiment(logger_cfg.experiment_name, artifact_location=artifact_location(logger_cfg))
