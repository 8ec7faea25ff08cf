"""The stage modules, their data modules, callbacks and logger are built from config entries naming a `_target_`:
a key is a constructor argument, an unknown key is named."""

from __future__ import annotations

import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from omegaconf import OmegaConf
from test_train_e2e import compose_train, tiny_overrides

import train
from callbacks.best_adapter import BestAdapterCallback
from callbacks.mlflow_steps import MLflowStepsCallback
from callbacks.rollout_table import RolloutTableCallback
from callbacks.training_curves import TrainingCurvesCallback
from cqr_lightning import builders
from cqr_lightning.builders import (
    build_datamodule,
    build_module,
    build_sampler,
    check_datamodule_settings,
    check_module_settings,
)
from cqr_lightning.errors import ConfigError
from cqr_lightning.formatting import response_prefix
from cqr_lightning.modules.rl import RLModule
from cqr_lightning.modules.warmup import WarmupModule
from cqr_lightning.observers import (
    build_callbacks,
    build_logger,
    check_callback_settings,
    check_logger_settings,
)
from cqr_lightning.preflight import check_training_inputs
from data_modules.conversations import ConversationDataModule
from data_modules.distilled import DistilledDataModule

ROOT = Path(__file__).resolve().parent.parent


def train_cfg(fixture_data_dir: Path, tmp_path: Path, *extra: str):
    return compose_train([*tiny_overrides(fixture_data_dir, tmp_path / "run", tmp_path / "mlflow.db"), *extra])


def tiny_policy() -> torch.nn.Module:
    """Stands in for the peft model: the constructors only list its parameters and turn its dropout off."""
    return torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout(0.1))


def test_an_rl_key_reaches_the_constructor(fixture_data_dir, tmp_path):
    overrides = ("rl.kl_beta=0.05", "rl.static_decoding=true", "rl.betas=[0.8,0.9]", "+rl.min_new_tokens=3", "seed=7")
    cfg = train_cfg(
        fixture_data_dir, tmp_path, *overrides, "rl.static_prompt_bucket=128", "rl.static_cache_at_full_length=true"
    )
    scorer = object()
    module = build_module(cfg, "rl", tiny_policy(), "tokenizer", scorer)
    assert type(module) is RLModule
    assert module.kl_beta == 0.05 and module.static_decoding is True and module.min_new_tokens == 3
    assert module.static_prompt_bucket == 128 and module.static_cache_at_full_length is True
    assert module.optimizer_settings["betas"] == (0.8, 0.9)
    assert module.max_new_tokens == 12 and module.group_size == 2  # tiny_overrides
    assert module.seed == 7 and module.scorer is scorer  # from the run, not the group
    assert module.max_prompt_length == cfg.model.max_prompt_length and module.response_format == cfg.response_format
    assert module.temperature == 0.7 and module.warmup_steps == 2  # conf/rl/default.yaml, the defaults' one place


def test_a_static_prompt_bucket_below_one_token_is_refused_naming_the_setting(fixture_data_dir, tmp_path):
    cfg = train_cfg(fixture_data_dir, tmp_path, "rl.static_decoding=true", "rl.static_prompt_bucket=0")
    with pytest.raises(ValueError, match="rl.static_prompt_bucket"):
        build_module(cfg, "rl", tiny_policy(), "tokenizer", object())


def test_scale_advantages_takes_its_names_and_its_older_booleans_and_refuses_others(fixture_data_dir, tmp_path):
    for value, expected in (("pooled", "pooled"), ("group", "group"), ("false", "none"), ("true", "group")):
        cfg = train_cfg(fixture_data_dir, tmp_path, f"rl.scale_advantages={value}")
        assert build_module(cfg, "rl", tiny_policy(), "tokenizer", object()).scale_advantages == expected
    cfg = train_cfg(fixture_data_dir, tmp_path, "rl.scale_advantages=batch")
    with pytest.raises(ValueError, match="rl.scale_advantages must be one of group, pooled, none, got 'batch'"):
        build_module(cfg, "rl", tiny_policy(), "tokenizer", object())


def test_a_warmup_key_reaches_the_constructor(fixture_data_dir, tmp_path):
    cfg = train_cfg(fixture_data_dir, tmp_path, "warmup.max_length=77", "warmup.schedule=linear", "warmup.lr=3e-4")
    module = build_module(cfg, "warmup", tiny_policy(), "tokenizer", None, warmup_steps=2, total_steps=9)
    assert type(module) is WarmupModule
    assert module.max_length == 77 and module.optimizer_settings["lr"] == 3e-4
    assert module.schedule_settings == {"warmup_steps": 2, "total_steps": 9, "schedule": "linear"}


def test_the_distillation_sampler_takes_its_warmup_keys(fixture_data_dir, tmp_path):
    overrides = ("warmup.num_samples=3", "warmup.top_p=0.9", "warmup.prefill_response=true", "seed=5")
    cfg = train_cfg(fixture_data_dir, tmp_path, *overrides)
    sampler = build_sampler(cfg, tiny_policy(), "tokenizer")
    assert sampler.num_samples == 3 and sampler.top_p == 0.9 and sampler.temperature == 0.7
    assert sampler.max_new_tokens == 12 and sampler.seed == 5  # tiny_overrides; the run's seed
    assert sampler.prefill == response_prefix(cfg.response_format) != ""


def test_a_target_subclass_is_built_with_the_same_settings(fixture_data_dir, tmp_path):
    class Wrapped(RLModule):
        pass

    cfg = train_cfg(fixture_data_dir, tmp_path, "rl.clip_eps=0.3")
    module = build_module(cfg, "rl", tiny_policy(), "tokenizer", None, target=Wrapped)
    assert type(module) is Wrapped and module.clip_eps == 0.3


@pytest.mark.parametrize(
    "override, message",
    [
        ("+rl.kl_betta=0.1", r"rl.kl_betta is not a setting: .*RLModule \(rl._target_\); valid keys: .*kl_beta"),
        ("+warmup.lr_decay=0.5", r"warmup.lr_decay is not a setting: .*WarmupModule"),
        ("+rl.seed=3", r"rl.seed is set by the run, not by the rl group: use seed"),
        ("+warmup.total_steps=5", r"warmup.total_steps is set by the run, not by the warmup group: use warmup.epochs"),
        ("rl._target_=cqr_lightning.modules.rl.Missing", r"rl._target_=cqr_lightning.modules.rl.Missing cannot be"),
        (
            "+logger.tracking_urii=x",
            r"logger.tracking_urii is not a setting: .*open_mlflow_logger \(logger._target_\); "
            r"valid keys: .*tracking_uri",
        ),
        ("+logger.run_id=abc", r"logger.run_id is set by the run, not by the config: use resume or ckpt_path"),
        (
            "+callbacks.rl.rollout_table.every_n_step=2",
            r"callbacks.rl.rollout_table.every_n_step is not a setting: "
            r".*RolloutTableCallback \(callbacks.rl.rollout_table._target_\); valid keys: every_n_steps$",
        ),
        ("+callbacks.warmup.best_adapter.dirpath=x", r"callbacks.warmup.best_adapter.dirpath is set by the run"),
        ("+callbacks.rl.mine._target_=nowhere.Mine", r"callbacks.rl.mine._target_=nowhere.Mine cannot be imported"),
        (
            "+rl.datamodule.shuffle=true",
            r"rl.datamodule.shuffle is not a setting: .*ConversationDataModule "
            r"\(rl.datamodule._target_\); valid keys: check_positives$",
        ),
        ("+warmup.datamodule.batch_size=3", r"warmup.datamodule.batch_size is set by the run.*the stage's batch_size"),
        ("+warmup.sampling_datamodule.limit=3", r"warmup.sampling_datamodule.limit is not a setting"),
    ],
)
def test_a_key_the_module_does_not_take_stops_before_a_model_loads(fixture_data_dir, tmp_path, override, message):
    with pytest.raises(ConfigError, match=message):
        check_training_inputs(train_cfg(fixture_data_dir, tmp_path, override))


def test_every_key_of_the_shipped_stage_configs_is_a_setting(fixture_data_dir, tmp_path):
    for experiment in (None, "paper", "pack_smollm2"):
        extra = [f"experiment={experiment}"] if experiment else []
        cfg = train_cfg(fixture_data_dir, tmp_path, *extra)
        check_logger_settings(cfg)
        for group in builders.RECIPE_KEYS:
            check_module_settings(cfg, group)
            check_datamodule_settings(cfg, group)
            check_callback_settings(cfg, group)


def test_the_grpo_step_benchmark_builds_its_module_through_the_shared_builder(
    fixture_data_dir, tiny_model_cfg, monkeypatch
):
    sys.path.insert(0, str(ROOT / "bench"))
    monkeypatch.setattr(sys, "path", sys.path)
    import grpo_step

    calls = []

    def spy(cfg, group, *args, **kwargs):
        calls.append(group)
        return build_module(cfg, group, *args, **kwargs)

    monkeypatch.setattr(builders, "build_module", spy)
    argv = ["--data", str(fixture_data_dir), "--group", "2", "--response", "5", "--max-prompt", "512", "--fast"]
    args = grpo_step.add_our_options(grpo_step.workload_parser()).parse_args(argv)
    module, data_cfg = grpo_step.build_module(args, OmegaConf.merge(tiny_model_cfg, {"device": "cpu"}))
    assert calls == ["rl"] and type(module) is RLModule
    assert module.group_size == 2 and module.max_new_tokens == 5 and module.min_new_tokens == 5
    assert module.fast_sampling is True and module.static_decoding is False and module.logprob_chunk_size is None
    assert module.optimizer_settings["lr"] == 1e-5 and module.warmup_steps == 0 and module.entropy_coef == 0.0
    assert module.max_prompt_length == 512 and module.response_format == "think_rewrite"
    assert data_cfg.train_split == "dev"


class StepProbe(L.Callback):
    """A user's own callback: notes each training step in `<stage folder>/<label>.txt`."""

    def __init__(self, dirpath: str, label: str = "probe"):
        self.path = Path(dirpath) / f"{label}.txt"

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        with self.path.open("a") as handle:
            handle.write(f"{trainer.global_step}\n")


class PlainDataModule(ConversationDataModule):
    """A user's own data module, taking one more setting."""

    def __init__(self, data_cfg, note: str = "", **kwargs):
        super().__init__(data_cfg, **kwargs)
        self.note = note


@pytest.mark.slow
def test_a_callback_added_on_the_command_line_is_built_and_called_during_a_run(fixture_data_dir, tmp_path):
    probe = ("+callbacks.rl.probe._target_=test_builders.StepProbe", "+callbacks.rl.probe.label=steps")
    cfg = train_cfg(fixture_data_dir, tmp_path, "stage=rl", "rl.max_steps=2", "logger=none", *probe)
    train.run(cfg)
    assert (tmp_path / "run" / "rl" / "steps.txt").read_text().split() == ["1", "2"]


def test_the_shipped_callbacks_are_built_with_the_run_arguments(fixture_data_dir, tmp_path):
    cfg = train_cfg(fixture_data_dir, tmp_path, "rl.table_every_n_steps=3", "callbacks.rl.training_curves=null")
    card = {"response_format": "rewrite_only"}
    rollout, steps, best = build_callbacks(cfg, "rl", dirpath=str(tmp_path), tokenizer="tokenizer", card=card)
    assert (
        type(steps) is MLflowStepsCallback and type(rollout) is RolloutTableCallback and rollout.every_n_steps == 3
    )  # ${rl.table_every_n_steps}
    assert type(best) is BestAdapterCallback and best.dirpath == tmp_path and best.card is card
    assert best.tokenizer == "tokenizer"
    curves = build_callbacks(cfg, "warmup", dirpath=str(tmp_path), tokenizer=None, card=card)[0]
    assert type(curves) is TrainingCurvesCallback and curves.train_metrics == ("train/loss",)
    assert build_callbacks(train_cfg(fixture_data_dir, tmp_path, "callbacks=none"), "rl", dirpath="x") == []


def test_a_data_module_is_built_from_its_target_with_the_stage_arguments(fixture_data_dir, tmp_path):
    cfg = train_cfg(fixture_data_dir, tmp_path)
    rl = build_datamodule(cfg, "rl", batch_size=3, eval_batch_size=2, val_limit=1, skip_train_ids=frozenset({"a"}))
    assert type(rl) is ConversationDataModule and rl.data_cfg is cfg.data
    assert (rl.batch_size, rl.skip_train_ids) == (3, frozenset({"a"}))
    warm = build_datamodule(cfg, "warmup", distilled_path=tmp_path / "d.jsonl", batch_size=2)
    assert type(warm) is DistilledDataModule and warm.distilled_path == tmp_path / "d.jsonl"
    own = ("rl.datamodule._target_=test_builders.PlainDataModule", "+rl.datamodule.note=mine")
    module = build_datamodule(train_cfg(fixture_data_dir, tmp_path, *own), "rl", batch_size=5)
    assert type(module) is PlainDataModule and module.note == "mine" and module.batch_size == 5


def test_the_logger_is_built_from_its_target_with_the_run_name_and_tags(fixture_data_dir, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    assert build_logger(train_cfg(fixture_data_dir, tmp_path, "logger=none"), "rl", run_dir) is None
    logger = build_logger(train_cfg(fixture_data_dir, tmp_path), "rl", run_dir)
    run = logger.experiment.get_run(logger.run_id)
    assert run.info.run_name == "rl-run" and run.data.tags["stage"] == "rl"
    assert run.data.params["rl.group_size"] == "2"
    named = build_logger(train_cfg(fixture_data_dir, tmp_path, "logger.run_name=mine"), "rl", run_dir)
    assert named.experiment.get_run(named.run_id).info.run_name == "mine"
    resumed = build_logger(train_cfg(fixture_data_dir, tmp_path), "rl", run_dir, run_id=logger.run_id)
    assert resumed.run_id == logger.run_id
