"""Rank-based GRPO rewards against hand-computed values."""

from __future__ import annotations

import math

import pytest

from cqr_lightning.grpo.rewards import (
    FORMAT_FAILURE_REWARD,
    REWARD_FUNCTIONS,
    get_reward_function,
    mrr3_reward,
    ndcg3_reward,
    rank_incentive_reward,
    recall10_reward,
    recall100_reward,
)


@pytest.mark.parametrize(
    ("rank", "expected"),
    [
        (1, 2.0),
        (2, 2.0 - 1 / 9),
        (5, 2.0 - 4 / 9),
        (10, 1.0),
        (11, 89 / 90),
        (55, 0.5),
        (99, 1 / 90),
        (100, 0.0),
        (101, 0.0),
        (5000, 0.0),
        (None, 0.0),
    ],
)
def test_rank_incentive_values(rank, expected):
    assert rank_incentive_reward(rank, True) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("rank", [1, 10, 50, 100, 101, None])
def test_format_failure_overrides_rank(rank):
    assert FORMAT_FAILURE_REWARD == -0.1
    for fn in REWARD_FUNCTIONS.values():
        assert fn(rank, False) == -0.1


def test_rank_incentive_is_monotone_and_bounded():
    values = [rank_incentive_reward(r, True) for r in range(1, 102)] + [rank_incentive_reward(None, True)]
    assert all(a >= b for a, b in zip(values, values[1:], strict=False))
    assert max(values) == 2.0 and min(values) == 0.0
    assert rank_incentive_reward(10, True) > rank_incentive_reward(11, True)


@pytest.mark.parametrize("fn", list(REWARD_FUNCTIONS.values()))
@pytest.mark.parametrize("rank", [0, -3])
def test_rank_below_one_is_rejected(fn, rank):
    with pytest.raises(ValueError, match="rank"):
        fn(rank, True)


def test_mrr3():
    assert [mrr3_reward(r, True) for r in (1, 2, 3, 4, 100, None)] == pytest.approx([1.0, 0.5, 1 / 3, 0.0, 0.0, 0.0])


def test_ndcg3_single_gold():
    expected = [1.0, 1 / math.log2(3), 0.5, 0.0, 0.0]
    assert [ndcg3_reward(r, True) for r in (1, 2, 3, 4, None)] == pytest.approx(expected)
    assert ndcg3_reward(2, True) == pytest.approx(0.6309297535714575)


def test_recall_rewards():
    assert [recall10_reward(r, True) for r in (1, 10, 11, None)] == [1.0, 1.0, 0.0, 0.0]
    assert [recall100_reward(r, True) for r in (1, 100, 101, None)] == [1.0, 1.0, 0.0, 0.0]


def test_registry_and_lookup():
    assert set(REWARD_FUNCTIONS) == {"rank_incentive", "mrr@3", "ndcg@3", "recall@10", "recall@100"}
    assert get_reward_function("rank_incentive") is rank_incentive_reward
    assert get_reward_function("ndcg@3") is ndcg3_reward
    with pytest.raises(ValueError, match="valid names: .*rank_incentive"):
        get_reward_function("mrr")
