"""Paths and OmegaConf resolvers shared by every entry point."""

from __future__ import annotations

import os
from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict

PACKAGE_DIR = Path(__file__).resolve().parent
PROJECT_DIR = PACKAGE_DIR.parent
CONF_DIR = PROJECT_DIR / "conf"
DEMO_DATA_DIR = PACKAGE_DIR / "demo_data"


def cache_dir() -> Path:
    """Where indexes and converted models are kept (`CQR_CACHE_DIR`, default ~/.cache/cqr_lightning)."""
    return Path(os.environ.get("CQR_CACHE_DIR", "~/.cache/cqr_lightning")).expanduser()


def data_dir_required() -> str:
    """`data=jsonl`'s folder until `data.dir` is given: reading it stops with the setting to add. (A `???` would not
    do: merged over the demo group's folder, OmegaConf keeps the demo folder, and the demo data would be read.)"""
    from cqr_lightning.errors import ConfigError

    raise ConfigError("data=jsonl needs data.dir=FOLDER, the folder holding corpus.jsonl and <split>.jsonl")


def compose_train_config(overrides: list[str]) -> DictConfig:
    """`conf/train.yaml` composed with command-line style `overrides`, as `train.py` composes it (for scripts that
    build a stage's objects outside `train.py`, such as bench/)."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="train", overrides=overrides)


def register_resolvers() -> None:
    """Make `${demo_data_dir:}`, `${cache_dir:}` and `${project_dir:}` usable in YAML; safe to call repeatedly.

    A path written in a config file starts with `${project_dir:}` so that it does not depend on the folder a command
    is started from; a relative path given on the command line stays relative to that folder, as usual."""
    resolvers = (
        ("demo_data_dir", lambda: str(DEMO_DATA_DIR)),
        ("data_dir_required", data_dir_required),
        ("cache_dir", lambda: str(cache_dir())),
        ("project_dir", lambda: str(PROJECT_DIR)),
    )
    for name, fn in resolvers:
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)


def own_job_folder(cfg: DictConfig, key: str) -> DictConfig:
    """In a `--multirun` sweep, point `cfg[key]` (run_dir, output_dir) at the job's own folder, `<sweep dir>/<job
    number>` (hydra.sweep in conf/), so two jobs never write into one folder; a single run keeps it as given."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        with open_dict(cfg):
            cfg[key] = HydraConfig.get().runtime.output_dir
    return cfg


register_resolvers()
