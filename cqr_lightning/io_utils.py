"""File-system helpers: folders that appear complete or not at all."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

TEMP_MARK = ".tmp-"


class TargetExistsError(FileExistsError):
    """The target of an atomic write was created by someone else before ours was done."""


@contextmanager
def atomic_dir(target: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary folder next to `target`; rename it to `target` when the block succeeds.

    The temporary folder lives in the same parent (so the final rename is atomic on one file system) and
    is named `.<target name>.tmp-<random>`.  If the block raises, the temporary folder is deleted and
    `target` is left untouched; a hard kill leaves only that hidden temporary folder behind, never a
    half-written `target`.  Raises TargetExistsError (after cleaning up) when `target` was created by
    someone else in the meantime and is not an empty folder.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}{TEMP_MARK}", dir=target.parent))
    os.chmod(tmp, 0o777 & ~_current_umask())  # mkdtemp makes it 0700: a shared cache must be readable by others
    try:
        yield tmp
        _fsync_tree(tmp)
        try:
            os.replace(tmp, target)
        except OSError as exc:
            if target.exists():
                raise TargetExistsError(f"{target} appeared while it was being built") from exc
            raise
        _fsync_path(target.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "w", encoding: str | None = "utf-8") -> Iterator:
    """Yield a handle on a temporary file beside `path`; flush, fsync and rename it to `path` when the block
    succeeds. On any error (a full disk, a crash in the writer) the temporary file is removed and `path` keeps its
    old content; an OSError that names no file names `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}{TEMP_MARK}{os.getpid()}")
    try:
        with open(tmp, mode, encoding=encoding if "b" not in mode else None) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as error:
        if error.filename is None and error.errno is not None:  # a failed write or fsync names no file: name ours
            error.filename = str(path)
        raise
    finally:
        tmp.unlink(missing_ok=True)


def write_json(path: str | os.PathLike, obj: object) -> None:
    """Write `obj` as indented UTF-8 JSON, through a temporary file renamed into place."""
    with atomic_file(path) as handle:
        json.dump(obj, handle, indent=2, ensure_ascii=False)
        handle.write("\n")


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_tree(root: Path) -> None:
    """Flush every file and folder under `root`, so the rename below never publishes unwritten data."""
    for folder, _, files in os.walk(root):
        for name in files:
            _fsync_path(Path(folder) / name)
        _fsync_path(Path(folder))


def _fsync_path(path: Path) -> None:
    """Best effort: some file systems refuse fsync on folders."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_jsonl(path: str | os.PathLike, rows: Iterable[dict]) -> None:
    """Write one JSON object per line, through a temporary file renamed into place."""
    with atomic_file(path) as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
