"""Atomic writes: a full disk or a failing writer leaves the old file and no temporary file; shared folders."""

from __future__ import annotations

import errno
import json
import os
import stat

import pytest

from cqr_lightning.io_utils import atomic_dir, write_json, write_jsonl


def rows_failing_after(n: int):
    for i in range(n):
        yield {"i": i}
    raise OSError(errno.ENOSPC, "No space left on device")


def test_a_full_disk_keeps_the_old_file_and_leaves_no_temporary_file(tmp_path):
    target = tmp_path / "metrics.jsonl"
    write_jsonl(target, [{"old": True}])
    with pytest.raises(OSError, match="No space left"):
        write_jsonl(target, rows_failing_after(3))
    assert [json.loads(line) for line in target.read_text().splitlines()] == [{"old": True}]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]


def test_a_full_disk_at_fsync_names_the_file_being_written(tmp_path, monkeypatch):
    """A failed write or fsync carries no file name; the error names the target so the user knows what failed."""
    target = tmp_path / "metrics.json"
    write_json(target, {"n": 1})

    def full_disk(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(OSError, match=f"No space left on device: '{target}'"):
        write_json(target, {"n": 2})
    assert json.loads(target.read_text()) == {"n": 1} and list(tmp_path.iterdir()) == [target]

    def no_errno(fd):
        raise OSError("write refused")

    monkeypatch.setattr(os, "fsync", no_errno)  # an OSError of one message keeps it as it is
    with pytest.raises(OSError, match=r"^write refused$"):
        write_json(target, {"n": 3})


def test_write_json_failing_midway_leaves_no_temporary_file(tmp_path):
    target = tmp_path / "metrics.json"
    with pytest.raises(TypeError):
        write_json(target, {"fine": 1, "not serializable": object()})
    assert list(tmp_path.iterdir()) == []
    write_json(target, {"n": 3})
    assert json.loads(target.read_text()) == {"n": 3}


def test_atomic_folders_follow_the_umask_so_a_shared_cache_is_readable(tmp_path):
    old = os.umask(0o022)
    try:
        with atomic_dir(tmp_path / "index") as folder:
            (folder / "part").write_text("x")
    finally:
        os.umask(old)
    mode = stat.S_IMODE((tmp_path / "index").stat().st_mode)
    assert mode == 0o755
