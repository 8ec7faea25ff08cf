"""The stage modules are built from their config groups: a key is a constructor argument, an unknown key is named."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from test_train_e2e import compose_train, tiny_overrides

from cqr_lightning import builders
from cqr_lightning.builders import build_module, build_sampler, check_module_settings
from cqr_lightning.errors import ConfigError
from cqr_lightning.formatting import response_prefix
from cqr_lightning.modules.rl import RLModule
from cqr_lightning.modules.warmup import WarmupModule
from cqr_lightning.preflight import check_training_inputs

ROOT = Path(__file__).resolve().parent.parent


def train_cfg(fixture_data_dir: Path, tmp_path: Path, *extra: str):
    return compose_train([*tiny_overrides(fixture_data_dir, tmp_path / "run", tmp_path / "mlflow.db"), *extra])


def tiny_policy() -> torch.nn.Module:
    """Stands in for the peft model: the constructors only list its parameters and turn its dropout off."""
    return torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout(0.1))


def test_an_rl_key_reaches_the_constructor(fixture_data_dir, tmp_path):
    overrides = ("rl.kl_beta=0.05", "rl.static_decoding=true", "rl.betas=[0.8,0.9]", "+rl.min_new_tokens=3", "seed=7")
    cfg = train_cfg(fixture_data_dir, tmp_path, *overrides)
    scorer = object()
    module = build_module(cfg, "rl", tiny_policy(), "tokenizer", scorer)
    assert type(module) is RLModule
    assert module.kl_beta == 0.05 and module.static_decoding is True and module.min_new_tokens == 3
    assert module.optimizer_settings["betas"] == (0.8, 0.9)
    assert module.max_new_tokens == 12 and module.group_size == 2  # tiny_overrides
    assert module.seed == 7 and module.scorer is scorer  # from the run, not the group
    assert module.max_prompt_length == cfg.model.max_prompt_length and module.response_format == cfg.response_format
    assert module.temperature == 0.7 and module.warmup_steps == 2  # conf/rl/default.yaml, the defaults' one place


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
    ],
)
def test_a_key_the_module_does_not_take_stops_before_a_model_loads(fixture_data_dir, tmp_path, override, message):
    with pytest.raises(ConfigError, match=message):
        check_training_inputs(train_cfg(fixture_data_dir, tmp_path, override))


def test_every_key_of_the_shipped_stage_configs_is_a_setting(fixture_data_dir, tmp_path):
    for experiment in (None, "paper", "pack_smollm2"):
        extra = [f"experiment={experiment}"] if experiment else []
        cfg = train_cfg(fixture_data_dir, tmp_path, *extra)
        for group in builders.RECIPE_KEYS:
            check_module_settings(cfg, group)


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
