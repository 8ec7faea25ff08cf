"""Choosing the checkpoint to resume from: newest step whatever its name, damaged files named, resume=false."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from cqr_lightning.errors import ConfigError
from cqr_lightning.resume import checkpoint_files, choose_checkpoint, inspect_checkpoint
from cqr_lightning.stages import checkpoint_to_resume


def write_checkpoint(path: Path, step: int, age: float = 0.0) -> Path:
    """A checkpoint as Lightning lays it out (global_step, weights, loops), dated `age` seconds ago."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"global_step": step, "state_dict": {"w": torch.full((64,), float(step))}, "loops": {}}, path)
    stamp = 1_700_000_000 - age
    os.utime(path, (stamp, stamp))
    return path


def date(path: Path, age: float) -> Path:
    stamp = 1_700_000_000 - age
    os.utime(path, (stamp, stamp))
    return path


def cfg(**settings):
    return OmegaConf.create({"resume": True, "ckpt_path": None, **settings})


def test_the_highest_step_wins_whatever_lightning_named_it(tmp_path):
    folder = tmp_path / "checkpoints"
    write_checkpoint(folder / "last.ckpt", 2, age=30)  # written by SIGTERM before any periodic checkpoint
    write_checkpoint(folder / "epoch=0-step=4.ckpt", 4, age=20)
    newest = write_checkpoint(folder / "last-v1.ckpt", 5, age=10)  # Lightning's later 'last' after that resume
    assert choose_checkpoint(checkpoint_files(folder)) == newest
    assert checkpoint_to_resume(cfg(), tmp_path) == str(newest)


def test_no_checkpoint_means_a_fresh_start(tmp_path):
    assert checkpoint_files(tmp_path / "checkpoints") == []
    assert checkpoint_to_resume(cfg(), tmp_path) is None


@pytest.mark.parametrize(
    "damage, problem",
    [
        (lambda path: path.write_bytes(b""), "empty"),
        (lambda path: path.write_bytes(os.urandom(4096)), "does not load"),
        (lambda path: path.write_bytes(path.read_bytes()[: path.stat().st_size // 2]), "does not load"),
    ],
    ids=["zero-byte", "random-bytes", "truncated"],
)
def test_a_damaged_newest_checkpoint_stops_with_both_choices(tmp_path, damage, problem):
    folder = tmp_path / "checkpoints"
    older = write_checkpoint(folder / "epoch=0-step=4.ckpt", 4, age=20)
    newest = write_checkpoint(folder / "last.ckpt", 6)
    damage(newest)
    date(newest, 0)
    assert inspect_checkpoint(newest).step is None and problem in inspect_checkpoint(newest).problem
    with pytest.raises(ConfigError) as error:
        checkpoint_to_resume(cfg(), tmp_path)
    message = str(error.value)
    assert str(newest) in message and problem in message
    assert f"ckpt_path={older}" in message and "resume=false" in message
    assert checkpoint_to_resume(cfg(ckpt_path=str(older)), tmp_path) == str(older)  # the first way out


class RunsCode:
    def __reduce__(self):
        return (print, ("code ran",))


@pytest.mark.parametrize(
    "content, problem",
    [
        (b"not a checkpoint", "not a complete checkpoint (truncated, or not written by torch.save)"),
        ("malicious", "holds objects other than tensors and plain values"),
    ],
    ids=["text", "pickled-code"],
)
def test_a_damaged_checkpoint_is_described_without_torch_s_advice(tmp_path, content, problem):
    """torch's own messages speak of mmap or suggest weights_only=False (which would run the file's code)."""
    path = tmp_path / "last.ckpt"
    if content == "malicious":
        torch.save({"global_step": 3, "extra": RunsCode()}, path)
    else:
        path.write_bytes(content)
    found = inspect_checkpoint(path)
    assert found.step is None and problem in found.problem
    assert "weights_only" not in found.problem and "mmap" not in found.problem


def test_a_damaged_only_checkpoint_offers_starting_over(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "last.ckpt").write_bytes(b"")
    with pytest.raises(ConfigError, match="last.ckpt is damaged.*resume=false") as error:
        checkpoint_to_resume(cfg(), tmp_path)
    assert "ckpt_path=" not in str(error.value)


def test_a_damaged_older_checkpoint_is_skipped(tmp_path):
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    broken = folder / "epoch=0-step=2.ckpt"
    broken.write_bytes(b"\x00" * 100)
    date(broken, 50)
    newest = write_checkpoint(folder / "last.ckpt", 6, age=1)
    assert checkpoint_to_resume(cfg(), tmp_path) == str(newest)


def test_temporary_files_of_an_unfinished_write_are_no_candidates(tmp_path):
    folder = tmp_path / "checkpoints"
    done = write_checkpoint(folder / "last.ckpt", 3, age=10)
    (folder / ".last.ckpt.tmp-123").write_bytes(b"partial")
    (folder / ".x.ckpt").write_bytes(b"")
    assert [f.path for f in checkpoint_files(folder)] == [done]


def test_a_damaged_or_missing_ckpt_path_is_named(tmp_path):
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"")
    with pytest.raises(ConfigError, match=f"ckpt_path={bad} cannot be used: the file is empty"):
        checkpoint_to_resume(cfg(ckpt_path=str(bad)), tmp_path)
    with pytest.raises(ConfigError, match="does not exist"):
        checkpoint_to_resume(cfg(ckpt_path=str(tmp_path / "none.ckpt")), tmp_path)


def test_resume_false_moves_the_old_checkpoints_aside_and_starts_over(tmp_path):
    folder = tmp_path / "checkpoints"
    write_checkpoint(folder / "last.ckpt", 5)
    assert checkpoint_to_resume(cfg(resume=False), tmp_path) is None
    assert not folder.exists()
    (moved,) = tmp_path.glob("checkpoints.old-*")
    assert inspect_checkpoint(moved / "last.ckpt").step == 5
    write_checkpoint(folder / "last.ckpt", 1)  # the new run's own, then a second start over the same second
    assert checkpoint_to_resume(cfg(resume=False), tmp_path) is None
    assert len(list(tmp_path.glob("checkpoints.old-*"))) == 2
    assert checkpoint_to_resume(cfg(resume=False), tmp_path) is None  # nothing left to move


def test_a_failed_json_write_keeps_the_old_file_and_leaves_no_temporary_one(tmp_path):
    """What a full disk does mid-write: the exception comes out, the previous content stays, nothing else is left."""
    from cqr_lightning.io_utils import write_json, write_jsonl

    write_json(tmp_path / "stats.json", {"kept": 3})
    write_jsonl(tmp_path / "rows.jsonl", [{"a": 1}])
    with pytest.raises(TypeError):
        write_json(tmp_path / "stats.json", {"kept": object()})
    with pytest.raises(TypeError):
        write_jsonl(tmp_path / "rows.jsonl", ({"a": 2} if i == 0 else {"b": object()} for i in range(2)))
    assert (tmp_path / "stats.json").read_text() == '{\n  "kept": 3\n}\n'
    assert (tmp_path / "rows.jsonl").read_text() == '{"a": 1}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rows.jsonl", "stats.json"]
