"""Streaming turns: laziness, bounded shuffling, determinism and resumable position."""

from __future__ import annotations

import json
import random

import pytest
from omegaconf import OmegaConf

from cqr_lightning.errors import DataError
from data_modules.conversations import ConversationDataModule, StreamPosition, TurnStream, shuffle_buffered


def write_split(tmp_path, n_turns: int = 23, corpus_ids=("p0", "p1")):
    (tmp_path / "corpus.jsonl").write_text(
        "".join(json.dumps({"id": pid, "contents": f"passage {pid}"}) + "\n" for pid in corpus_ids)
    )
    rows = [
        {"id": f"t{i}", "history": [], "question": f"question {i}", "positives": ["p0"], "rewrite": None}
        for i in range(n_turns)
    ]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "dev.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:5]))
    return OmegaConf.create(
        {
            "format": "jsonl",
            "dir": str(tmp_path),
            "corpus": str(tmp_path / "corpus.jsonl"),
            "train_split": "train",
            "eval_split": "dev",
            "shuffle_buffer": 8,
            "seed": 3,
        }
    )


def ids(batches):
    return [t.id for b in batches for t in b.turns]


def test_shuffle_buffer_is_a_permutation_and_bounded():
    seen_buffer = []

    def items():
        for i in range(100):
            seen_buffer.append(i)
            yield i

    out = []
    for value in shuffle_buffered(items(), 10, random.Random(0)):
        out.append(value)
        assert len(seen_buffer) - len(out) <= 10, "never more than buffer_size items held"
    assert sorted(out) == list(range(100)) and out != list(range(100))


def test_stream_is_lazy():
    pulled = []

    def make():
        for i in range(1_000_000):
            pulled.append(i)
            yield i

    stream = TurnStream(make, shuffle_buffer=4)
    iterator = iter(stream)
    next(iterator)
    assert len(pulled) <= 5


def test_train_order_is_deterministic_per_seed_and_changes_per_epoch(tmp_path):
    cfg = write_split(tmp_path)
    first = ConversationDataModule(cfg, batch_size=4).train_dataloader()
    second = ConversationDataModule(cfg, batch_size=4).train_dataloader()
    epoch0 = ids(first)
    assert epoch0 == ids(second)
    assert sorted(epoch0) == sorted(f"t{i}" for i in range(23))
    assert ids(first) != epoch0, "epoch 1 is shuffled differently"
    other = ConversationDataModule(OmegaConf.merge(cfg, {"seed": 4}), batch_size=4).train_dataloader()
    assert ids(other) != epoch0


def test_resume_from_position_continues_with_the_next_turn(tmp_path):
    cfg = write_split(tmp_path)
    full = ids(ConversationDataModule(cfg, batch_size=4).train_dataloader())
    module = ConversationDataModule(cfg, batch_size=4)
    batches = iter(module.train_dataloader())
    consumed = [next(batches) for _ in range(3)]
    assert consumed[-1].position == StreamPosition(0, 12)
    resumed = ConversationDataModule(cfg, batch_size=4)
    resumed.load_state_dict({"epoch": consumed[-1].position.epoch, "consumed": consumed[-1].position.consumed})
    assert ids(consumed) + ids(resumed.train_dataloader()) == full


def test_unknown_positive_names_file_and_line(tmp_path):
    cfg = write_split(tmp_path, corpus_ids=("p1",))
    with pytest.raises(DataError, match=r"train.jsonl:1: turn 't0': positive passage id 'p0' is not in the corpus"):
        next(iter(ConversationDataModule(cfg).train_dataloader()))


def test_val_and_predict_keep_file_order_and_limits(tmp_path):
    cfg = write_split(tmp_path)
    module = ConversationDataModule(cfg, eval_batch_size=2, val_limit=3, train_limit=6)
    assert ids(module.val_dataloader()) == ["t0", "t1", "t2"]
    assert ids(module.predict_dataloader()) == [f"t{i}" for i in range(6)]


def test_a_validation_pass_abandoned_half_way_does_not_shorten_the_next(tmp_path):
    cfg = write_split(tmp_path)
    loader = ConversationDataModule(cfg, eval_batch_size=2).val_dataloader()
    next(iter(loader))  # as Lightning's fast-forward over a validation on resume, or a SIGTERM between batches
    assert ids(loader) == [f"t{i}" for i in range(5)]
    assert ids(loader) == [f"t{i}" for i in range(5)]


def test_skipped_turns_leave_training_but_not_validation(tmp_path):
    cfg = write_split(tmp_path)
    skip = frozenset({"t0", "t3", "t22"})
    module = ConversationDataModule(cfg, batch_size=4, skip_train_ids=skip)
    trained = ids(module.train_dataloader())
    assert sorted(trained) == sorted(f"t{i}" for i in range(23) if f"t{i}" not in skip)
    assert ids(module.val_dataloader()) == [f"t{i}" for i in range(5)]
