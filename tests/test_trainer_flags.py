"""The `trainer` config group: Lightning's flags passed through, conflicting ones refused up front."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from lightning.pytorch.strategies import DDPStrategy

from cqr_lightning.config import compose_train_config as compose_train
from cqr_lightning.errors import ConfigError
from cqr_lightning.stages import make_trainer
from cqr_lightning.trainer_flags import check_trainer_settings, trainer_flags


def test_default_group_passes_lightning_flags_and_keeps_the_accelerator_override():
    flags = trainer_flags(compose_train(["trainer.accelerator=cpu"]))
    assert flags == {"accelerator": "cpu", "devices": 1, "num_nodes": 1, "strategy": "auto", "log_every_n_steps": 1}


def test_ddp_group_is_two_devices_with_a_ddp_strategy_that_does_not_sync_buffers_each_forward():
    cfg = compose_train(["trainer=ddp", "trainer.accelerator=cpu"])  # gloo: runs on any machine
    assert cfg.trainer.devices == 2 and cfg.trainer.strategy == "ddp" and cfg.trainer.accelerator == "cpu"
    strategy = trainer_flags(cfg)["strategy"]
    assert isinstance(strategy, DDPStrategy) and strategy._ddp_kwargs == {"broadcast_buffers": False}


def test_make_trainer_builds_the_trainer_from_the_group(tmp_path):
    cfg = compose_train(["model=tiny", "trainer.accelerator=cpu", "+trainer.enable_progress_bar=false"])
    trainer = make_trainer(cfg, cfg.rl, tmp_path, None, [], max_steps=1)
    assert isinstance(trainer, L.Trainer) and trainer.num_devices == 1 and trainer.progress_bar_callback is None


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("+trainer.max_steps=5", r"trainer.max_steps is set by the training stage: use rl.max_steps"),
        ("+trainer.accumulate_grad_batches=2", r"use warmup.accumulate_grad_batches"),
        ("trainer.strategy=fsdp", r"trainer.strategy=fsdp is not supported"),
        ("trainer.devices=2", r"trainer.devices=2 .* need trainer.strategy=ddp"),
        ("trainer.precision=16-mixed", r"trainer.precision=16-mixed conflicts with model.compute_dtype=bfloat16"),
        ("trainer.precision=bf16-true", r"set trainer.precision=null or bf16-mixed"),
    ],
)
def test_conflicting_settings_stop_naming_the_setting(override, message):
    with pytest.raises(ConfigError, match=message):
        check_trainer_settings(compose_train(["model=tiny", override]))


def test_precision_matching_the_compute_dtype_is_accepted():
    check_trainer_settings(compose_train(["model=tiny", "trainer.precision=bf16-mixed"]))
    check_trainer_settings(compose_train(["model=tiny", "model.compute_dtype=float32", "trainer.precision=32-true"]))


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible here")
def test_a_gpu_accelerator_without_a_visible_gpu_stops_naming_the_setting():
    with pytest.raises(
        ConfigError, match=r"trainer.accelerator=gpu, but torch .* sees no GPU: use trainer.accelerator"
    ):
        check_trainer_settings(compose_train(["model=tiny", "trainer.accelerator=gpu"]))
    check_trainer_settings(compose_train(["model=tiny", "trainer.accelerator=cpu"]))
