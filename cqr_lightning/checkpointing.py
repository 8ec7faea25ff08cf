"""Checkpoints written atomically: a crash mid-write never leaves a truncated file in place."""

from __future__ import annotations

import os
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from cqr_lightning.io_utils import atomic_file


class AtomicCheckpointIO(TorchCheckpointIO):
    """Save to a temporary file beside the target, fsync, then rename it into place."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        with atomic_file(path, "wb") as handle:
            torch.save(checkpoint, handle)

    def load_checkpoint(self, path, map_location: Any | None = None, weights_only: bool | None = None) -> dict:
        return torch.load(path, map_location=map_location or "cpu", weights_only=True)


def read_checkpoint_extras(path: str | os.PathLike) -> dict:
    """The run-level extras (`cqr_extras`: MLflow run id, ...) stored in a checkpoint, without the weights."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    return dict(checkpoint.get("cqr_extras", {}))
