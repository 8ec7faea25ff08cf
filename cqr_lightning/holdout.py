"""In-domain held-out conversations: whole conversations of the training split set aside, never trained on.

`data.holdout` names shares of the training split's conversations; each conversation goes, by a hash of its
key, to the `holdout_val` split (validation and model selection), the `holdout_test` split (reported, never
chosen on) or stays in training. The assignment depends only on the conversation, not on the seed or the file
order, so every run, stage and command sees the same parts.

A conversation is known by its first user message (the first history turn, or the question of a first turn):
turns of one conversation share it whatever their ids look like, and two conversations that open with the
same words land in the same part, so nothing of a held-out conversation leaks into training.
"""

from __future__ import annotations

import hashlib
import re

from cqr_lightning.errors import ConfigError
from cqr_lightning.records import USER, Turn

HOLDOUT_VAL, HOLDOUT_TEST, TRAIN_PART = "holdout_val", "holdout_test", "train"
HOLDOUT_SPLITS = (HOLDOUT_VAL, HOLDOUT_TEST)


def conversation_key(turn: Turn) -> str:
    """The first user message of the turn's conversation, case- and space-normalised."""
    first = next((u.text for u in turn.history if u.role == USER), turn.question)
    return re.sub(r"\s+", " ", first.casefold()).strip()


def conversation_position(key: str) -> float:
    """A uniform number in [0, 1) fixed by the key (the first 8 bytes of its SHA-256)."""
    digest = hashlib.sha256(key.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def holdout_part(turn: Turn, val_share: float, test_share: float) -> str:
    """`holdout_val`, `holdout_test` or `train`: which part of the training split the turn belongs to."""
    position = conversation_position(conversation_key(turn))
    if position < val_share:
        return HOLDOUT_VAL
    if position < val_share + test_share:
        return HOLDOUT_TEST
    return TRAIN_PART


def holdout_shares(data_cfg) -> tuple[float, float]:
    """(validation share, test share) from `data.holdout`, checked; (0, 0) when there is none."""
    holdout = data_cfg.get("holdout") or {}
    val, test = float(holdout.get("val") or 0.0), float(holdout.get("test") or 0.0)
    if val < 0 or test < 0 or val + test >= 1:
        raise ConfigError(f"data.holdout.val={val} and data.holdout.test={test} must be >= 0 and sum to less than 1")
    return val, test
