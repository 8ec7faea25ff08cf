"""Which checkpoint a stage resumes from: the newest complete one, whatever Lightning named it.

Lightning's ModelCheckpoint writes `last.ckpt`, but after a resume from a checkpoint it did not write itself (the
one a SIGTERM leaves) it writes `last-v1.ckpt`, `last-v2.ckpt`, ... beside it, and the periodic ones are
`epoch=E-step=S.ckpt`. Every `*.ckpt` of the folder is a candidate; the one with the highest global step that
loads wins. A newest file that does not load (zero bytes, truncated, not a checkpoint) stops the run with the
choices named, rather than resuming from an older step or starting over in silence.
"""

from __future__ import annotations

import logging
import pickle
import shutil
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

from cqr_lightning.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CheckpointFile:
    path: Path
    mtime: float  # seconds since the epoch
    step: int | None  # Lightning's global_step; None when the file does not load
    problem: str | None = None  # why it does not load


def inspect_checkpoint(path: str | Path) -> CheckpointFile:
    """The global step stored in a checkpoint, or the reason it cannot be read."""
    path = Path(path)
    stat = path.stat()
    if stat.st_size == 0:
        return CheckpointFile(path, stat.st_mtime, None, "the file is empty (0 bytes)")
    if not zipfile.is_zipfile(path):  # torch.save writes a zip archive, whose directory is at the end of the file
        problem = "it does not load: not a complete checkpoint (truncated, or not written by torch.save)"
        return CheckpointFile(path, stat.st_mtime, None, problem)
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError:  # torch's message suggests weights_only=False, which would run the file's code
        problem = "it does not load: it holds objects other than tensors and plain values (not our checkpoint)"
        return CheckpointFile(path, stat.st_mtime, None, problem)
    except Exception as error:  # torch reports a damaged file with many exception types
        reason = str(error).splitlines()[0] if str(error) else ""
        return CheckpointFile(path, stat.st_mtime, None, f"it does not load ({type(error).__name__}: {reason})")
    step = checkpoint.get("global_step") if isinstance(checkpoint, dict) else None
    if not isinstance(step, int):
        return CheckpointFile(path, stat.st_mtime, None, "it holds no 'global_step' (not a Lightning checkpoint)")
    return CheckpointFile(path, stat.st_mtime, step)


def checkpoint_files(folder: str | Path) -> list[CheckpointFile]:
    """Every checkpoint of a folder (temporary files of unfinished writes left out), inspected."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    paths = sorted(p for p in folder.glob("*.ckpt") if p.is_file() and not p.name.startswith("."))
    return [inspect_checkpoint(path) for path in paths]


def choose_checkpoint(files: list[CheckpointFile]) -> Path | None:
    """The loadable checkpoint with the highest step (the newest file among equals); None when there is none.

    Raises ConfigError when a file that does not load is at least as new as that choice: it may hold later
    steps, so neither resuming from an older one nor starting over happens without the user saying so."""
    good = [f for f in files if f.step is not None]
    best = max(good, key=lambda f: (f.step, f.mtime), default=None)
    broken = [f for f in files if f.step is None and (best is None or f.mtime >= best.mtime)]
    if broken:
        newest = max(broken, key=lambda f: f.mtime)
        older = f"ckpt_path={best.path} (step {best.step}) to resume from the newest that loads, or " if best else ""
        raise ConfigError(
            f"cannot resume: the newest checkpoint {newest.path} is damaged ({newest.problem}). Rerun with "
            f"{older}resume=false to start the stage over (the checkpoints are moved aside, not deleted)"
        )
    for f in files:
        if f.step is None:
            log.warning("ignoring checkpoint %s: %s; a newer one loads", f.path, f.problem)
    return best.path if best else None


def checked_checkpoint(path: str | Path) -> str:
    """An explicit `ckpt_path`, checked to exist and load."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"ckpt_path={path} does not exist")
    found = inspect_checkpoint(path)
    if found.step is None:
        raise ConfigError(f"ckpt_path={path} cannot be used: {found.problem}")
    return str(path)


def set_aside(folder: str | Path) -> Path | None:
    """Move a checkpoints folder to `<name>.old-<UTC time>` so a fresh start neither resumes from it nor has
    Lightning version its new files against it; None when there was nothing to move."""
    folder = Path(folder)
    if not folder.exists() or not any(folder.iterdir()):
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    target = folder.with_name(f"{folder.name}.old-{stamp}")
    suffix = 1
    while target.exists():
        target = folder.with_name(f"{folder.name}.old-{stamp}-{suffix}")
        suffix += 1
    shutil.move(str(folder), str(target))
    log.warning("resume=false: moved the earlier checkpoints to %s; this stage starts over", target)
    return target
