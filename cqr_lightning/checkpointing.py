"""Checkpoints written atomically: a crash mid-write never leaves a truncated file in place."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from cqr_lightning.io_utils import TEMP_MARK


class AtomicCheckpointIO(TorchCheckpointIO):
    """Save to a temporary file beside the target, fsync, then rename it into place."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}{TEMP_MARK}{os.getpid()}")
        try:
            with open(tmp, "wb") as handle:
                torch.save(checkpoint, handle)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)

    def load_checkpoint(self, path, map_location: Any | None = None, weights_only: bool | None = None) -> dict:
        return torch.load(path, map_location=map_location or "cpu", weights_only=True)


def read_checkpoint_extras(path: str | os.PathLike) -> dict:
    """The run-level extras (`cqr_extras`: MLflow run id, ...) stored in a checkpoint, without the weights."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    return dict(checkpoint.get("cqr_extras", {}))
