"""The training bar counts optimizer steps out of max_steps, also when a run resumes mid-stream."""

from __future__ import annotations

import itertools

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, IterableDataset

from cqr_lightning.run_control.step_progress import StepProgressBar, step_progress_bar


class Stream(IterableDataset):
    def __iter__(self):
        return (torch.ones(2) for _ in itertools.count())


class Linear(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)

    def training_step(self, batch, batch_idx):
        return self.layer(batch).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)

    def train_dataloader(self):
        return DataLoader(Stream(), batch_size=1)


def fit(tmp_path, max_steps, ckpt=None, accumulate=1):
    bar = StepProgressBar()
    trainer = L.Trainer(
        max_steps=max_steps,
        accumulate_grad_batches=accumulate,
        callbacks=[bar],
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(Linear(), ckpt_path=ckpt)
    task = bar.progress.tasks[bar.train_progress_bar_id]
    return trainer, task


def test_bar_counts_steps_out_of_max_steps_after_a_resume(tmp_path):
    pytest.importorskip("rich")
    trainer, task = fit(tmp_path, max_steps=3)
    assert (task.completed, task.total, task.description) == (3, 3, "steps")
    trainer.save_checkpoint(tmp_path / "at3.ckpt")

    resumed, task = fit(tmp_path, max_steps=6, ckpt=str(tmp_path / "at3.ckpt"))
    assert resumed.global_step == 6
    assert (task.completed, task.total) == (6, 6)  # Lightning's own bar: the batch index against 3 remaining


def test_bar_counts_optimizer_steps_not_batches(tmp_path):
    pytest.importorskip("rich")
    _, task = fit(tmp_path, max_steps=2, accumulate=3)
    assert (task.completed, task.total) == (2, 2)
    assert [type(bar) for bar in step_progress_bar()] == [StepProgressBar]
