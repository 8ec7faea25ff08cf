"""GRPO loss pieces against hand-computed values, plus micro-batch equivalence."""

from __future__ import annotations

import math

import pytest
import torch

from cqr_lightning.grpo.losses import (
    AGGREGATION_MODES,
    aggregate,
    clipped_surrogate,
    group_advantages,
    grpo_loss,
    k3_kl,
    token_entropy,
    token_log_probs,
)

ATOL = 1e-6


def close(actual, expected) -> None:
    expected = torch.as_tensor(expected, dtype=actual.dtype)
    torch.testing.assert_close(actual, expected, atol=ATOL, rtol=0)


# group_advantages


def test_group_advantages_hand_values():
    # mean 2.5; sample std sqrt((2.25 + 0.25 + 0.25 + 2.25) / 3) = sqrt(5 / 3)
    std = math.sqrt(5 / 3)
    adv = group_advantages(torch.tensor([1.0, 2.0, 3.0, 4.0]), group_size=4)
    close(adv, [d / (std + 1e-6) for d in (-1.5, -0.5, 0.5, 1.5)])


def test_group_advantages_equal_group_is_exactly_zero():
    adv = group_advantages(torch.full((8,), 0.1), group_size=8)
    assert torch.equal(adv, torch.zeros(8))
    adv = group_advantages(torch.full((4,), 1.7), group_size=4, scale=False)
    assert torch.equal(adv, torch.zeros(4))


def test_group_advantages_groups_are_independent():
    rewards = torch.tensor([1.0, 2.0, 3.0, 4.0, 0.5, 0.5, 0.5, 0.5, 0.0, 0.0, 2.0, 2.0])
    adv = group_advantages(rewards, group_size=4)
    close(adv[:4], group_advantages(rewards[:4], group_size=4))
    assert torch.equal(adv[4:8], torch.zeros(4))
    # [0, 0, 2, 2]: mean 1, sample std sqrt(4 / 3)
    close(adv[8:], [d / (math.sqrt(4 / 3) + 1e-6) for d in (-1.0, -1.0, 1.0, 1.0)])


def test_group_advantages_unscaled_is_mean_centring():
    adv = group_advantages(torch.tensor([1, 2, 3, 4, 2, 0]), group_size=2, scale=False)
    close(adv, [-0.5, 0.5, -0.5, 0.5, 1.0, -1.0])


def test_group_advantages_validates():
    with pytest.raises(ValueError, match="groups of 4"):
        group_advantages(torch.zeros(6), group_size=4)
    with pytest.raises(ValueError, match="group_size"):
        group_advantages(torch.zeros(6), group_size=1)
    with pytest.raises(ValueError, match="1-D"):
        group_advantages(torch.zeros(2, 4), group_size=4)


def test_group_advantages_pooled_divides_every_group_by_one_batch_std():
    rewards = torch.tensor([4.0, 4.0, 4.0, 3.75, 1.0, 3.0, 1.0, 3.0])  # a tie-breaker group, a group whose ranks differ
    centred = torch.tensor([0.0625, 0.0625, 0.0625, -0.1875, -1.0, 1.0, -1.0, 1.0])
    pooled_std = math.sqrt(float(centred.square().mean()))
    close(group_advantages(rewards, group_size=4, scale="pooled"), centred / (pooled_std + 1e-6))


def test_group_advantages_pooled_scale_ignores_flat_groups():
    informative = torch.tensor([4.0, 4.0, 4.0, 3.75, 1.0, 3.0, 1.0, 3.0])
    with_flat = torch.cat([informative, torch.full((8,), 2.0)])  # two more groups whose samples all tie
    pooled = group_advantages(with_flat, group_size=4, scale="pooled")
    close(pooled[:8], group_advantages(informative, group_size=4, scale="pooled"))
    assert torch.equal(pooled[8:], torch.zeros(8))


def test_group_advantages_pooled_keeps_a_tie_breaker_small_where_group_scaling_inflates_it():
    rewards = torch.tensor([4.0, 4.0, 4.0, 3.75, 1.0, 3.0, 1.0, 3.0])
    grouped = group_advantages(rewards, group_size=4, scale="group")
    pooled = group_advantages(rewards, group_size=4, scale="pooled")
    # group scaling: the -0.25 tie-breaker earns a larger advantage than a rank gain in the other group
    assert grouped[:4].abs().max() > grouped[4:].abs().max()
    # pooled: the tie-breaker's advantages keep their 0.25 : 2 proportion to the rank differences
    close(pooled[:4].abs().max() / pooled[4:].abs().max(), 0.1875)


def test_group_advantages_pooled_reduce_sum_gives_the_global_batch_scale():
    rewards = torch.tensor([1.0, 2.0, 0.0, 4.0, 5.0, 5.0, 2.0, 0.0])
    whole = group_advantages(rewards, group_size=2, scale="pooled")
    halves = [rewards[:4], rewards[4:]]  # two processes, two groups each; (5, 5) is flat

    def all_reduce_with(other):  # sums this process's values with the other's, in the order they are asked for
        centred = group_advantages(other, group_size=2, scale="none")
        informative = float((centred.reshape(-1, 2).abs().sum(dim=-1) > 0).sum() * 2)  # responses of unflat groups
        pending = [float(centred.square().sum()), informative]  # the squares, then the count
        return lambda value: value + pending.pop(0)

    first = group_advantages(halves[0], 2, scale="pooled", reduce_sum=all_reduce_with(halves[1]))
    second = group_advantages(halves[1], 2, scale="pooled", reduce_sum=all_reduce_with(halves[0]))
    close(torch.cat([first, second]), whole)


def test_group_advantages_scale_names_and_their_boolean_forms():
    rewards = torch.tensor([1.0, 2.0, 3.0, 6.0])
    assert torch.equal(group_advantages(rewards, 2, scale=True), group_advantages(rewards, 2, scale="group"))
    assert torch.equal(group_advantages(rewards, 2, scale=False), group_advantages(rewards, 2, scale="none"))
    assert torch.equal(group_advantages(torch.full((4,), 2.0), 2, scale="pooled"), torch.zeros(4))
    with pytest.raises(ValueError, match="rl.scale_advantages must be one of group, pooled, none"):
        group_advantages(rewards, 2, scale="batch")


# token_log_probs / token_entropy


def test_token_log_probs_matches_log_softmax_gather():
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 11) * 4
    labels = torch.randint(0, 11, (3, 5))
    expected = torch.log_softmax(logits, dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    close(token_log_probs(logits, labels), expected)


def test_token_log_probs_upcasts_and_gradients_match():
    torch.manual_seed(1)
    logits = (torch.randn(2, 4, 7) * 3).to(torch.bfloat16)
    labels = torch.randint(0, 7, (2, 4))
    logp = token_log_probs(logits, labels)
    assert logp.dtype == torch.float32
    ref = torch.log_softmax(logits.float(), dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    close(logp, ref)

    a = torch.randn(2, 4, 7, requires_grad=True)
    b = a.detach().clone().requires_grad_(True)
    token_log_probs(a, labels).sum().backward()
    torch.log_softmax(b, dim=-1).gather(-1, labels.unsqueeze(-1)).sum().backward()
    close(a.grad, b.grad)


def test_token_log_probs_negative_labels_give_zero():
    logits = torch.randn(1, 3, 5)
    logp = token_log_probs(logits, torch.tensor([[2, -100, -100]]))
    assert logp[0, 1:].tolist() == [0.0, 0.0]
    assert logp[0, 0] < 0
    with pytest.raises(ValueError, match="labels"):
        token_log_probs(logits, torch.zeros(1, 4, dtype=torch.long))


def test_token_entropy():
    torch.manual_seed(2)
    logits = torch.randn(2, 3, 6) * 2
    probs = torch.softmax(logits, dim=-1)
    close(token_entropy(logits), -(probs * torch.log_softmax(logits, dim=-1)).sum(-1))
    close(token_entropy(torch.zeros(1, 2, 8)), [[math.log(8), math.log(8)]])


# k3_kl


def test_k3_kl_values():
    logp = torch.tensor([math.log(0.5), 0.0, -1.3])
    ref = torch.tensor([math.log(0.25), 1.0, -1.3])
    # d = -ln 2: 0.5 + ln 2 - 1; d = 1: e - 2; equal: 0
    close(k3_kl(logp, ref), [math.log(2) - 0.5, math.e - 2, 0.0])
    torch.manual_seed(3)
    assert (k3_kl(torch.randn(100), torch.randn(100)) >= 0).all()


# clipped_surrogate


def surrogate_case(ratio: float, advantage: float, **kwargs):
    logp = torch.tensor([[math.log(ratio)]], requires_grad=True)
    loss, frac = clipped_surrogate(logp, torch.zeros(1, 1), torch.tensor([advantage]), **kwargs)
    loss.sum().backward()
    return loss.item(), frac.item(), logp.grad.item()


@pytest.mark.parametrize(
    ("ratio", "advantage", "loss", "clipped", "grad"),
    [
        (1.5, 1.0, -1.2, 1.0, 0.0),  # positive A, rho above 1 + eps: clipped, no gradient
        (0.5, 1.0, -0.5, 0.0, -0.5),  # positive A, rho below 1 - eps: not clipped, d(-rho A)/dlogp = -rho A
        (0.5, -1.0, 0.8, 1.0, 0.0),  # negative A, rho below 1 - eps: clipped, no gradient
        (1.5, -1.0, 1.5, 0.0, 1.5),  # negative A, rho above 1 + eps: not clipped
        (1.1, 2.0, -2.2, 0.0, -2.2),  # inside the range
        (1.5, 0.0, 0.0, 0.0, 0.0),  # zero advantage
    ],
)
def test_clipped_surrogate_cases(ratio, advantage, loss, clipped, grad):
    got = surrogate_case(ratio, advantage)
    assert got == pytest.approx((loss, clipped, grad), abs=ATOL)


def test_clipped_surrogate_clip_higher():
    assert surrogate_case(1.25, 1.0) == pytest.approx((-1.2, 1.0, 0.0), abs=ATOL)
    assert surrogate_case(1.25, 1.0, clip_eps_high=0.28) == pytest.approx((-1.25, 0.0, -1.25), abs=ATOL)
    # the low side still uses clip_eps
    assert surrogate_case(0.7, -1.0, clip_eps_high=0.28) == pytest.approx((0.8, 1.0, 0.0), abs=ATOL)


def test_clipped_surrogate_fraction_uses_mask_and_token_advantages():
    logp = torch.log(torch.tensor([[1.5, 1.0, 1.5], [0.5, 0.5, 1.0]]))
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    loss, frac = clipped_surrogate(logp, torch.zeros(2, 3), torch.tensor([1.0, -1.0]), mask=mask)
    close(loss, [[-1.2, -1.0, -1.2], [0.8, 0.8, 1.0]])
    close(frac, 3 / 5)
    token_adv = torch.tensor([[1.0, 1.0, 1.0], [-1.0, 1.0, -1.0]])
    loss, frac = clipped_surrogate(logp, torch.zeros(2, 3), token_adv, mask=mask)
    close(loss, [[-1.2, -1.0, -1.2], [0.8, -0.5, 1.0]])
    close(frac, 2 / 5)
    with pytest.raises(ValueError, match="advantages"):
        clipped_surrogate(logp, torch.zeros(2, 3), torch.zeros(3))


# aggregate

PER_TOKEN = torch.tensor([[1.0, 2.0, 3.0, float("nan")], [4.0, 5.0, 99.0, 99.0]])
MASK = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])


def test_aggregate_modes_hand_values():
    close(aggregate(PER_TOKEN, MASK, "token_mean"), 15 / 5)
    close(aggregate(PER_TOKEN, MASK, "sequence_mean"), (2.0 + 4.5) / 2)
    close(aggregate(PER_TOKEN, MASK, "constant", constant=10.0), 1.5)
    close(aggregate(PER_TOKEN, MASK.bool(), "token_mean", num_tokens_total=10), 1.5)
    close(aggregate(PER_TOKEN, MASK, "sequence_mean", num_sequences_total=4), 6.5 / 4)
    close(aggregate(PER_TOKEN, torch.zeros_like(MASK), "token_mean"), 0.0)


def test_aggregate_validates():
    with pytest.raises(ValueError, match="valid modes: token_mean, sequence_mean, constant"):
        aggregate(PER_TOKEN, MASK, "mean")
    with pytest.raises(ValueError, match="needs `constant`"):
        aggregate(PER_TOKEN, MASK, "constant")
    with pytest.raises(ValueError, match="num_tokens_total must be positive"):
        aggregate(PER_TOKEN, MASK, "token_mean", num_tokens_total=0)
    with pytest.raises(ValueError, match="do not match mask"):
        aggregate(PER_TOKEN, MASK[:, :3], "token_mean")


def random_batch(seed: int, batch: int = 6, length: int = 7):
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([7, 3, 1, 5, 2, 6])[:batch]
    mask = (torch.arange(length)[None, :] < lengths[:, None]).long()  # [B, L]
    logp = (-torch.rand(batch, length, generator=gen) * 3).requires_grad_(True)
    old_logp = logp.detach() + torch.randn(batch, length, generator=gen) * 0.3
    ref_logp = logp.detach() + torch.randn(batch, length, generator=gen) * 0.3
    entropy = torch.rand(batch, length, generator=gen).requires_grad_(True)
    advantages = torch.randn(batch, generator=gen)
    return logp, old_logp, ref_logp, entropy, advantages, mask


def split(batch_size: int, mask: torch.Tensor, sizes: list[int]):
    """Row slices plus each micro-batch's own padded length, as a collator padding per micro-batch would."""
    start = 0
    for size in sizes:
        rows = slice(start, start + size)
        yield rows, int(mask[rows].sum(-1).max())
        start += size
    assert start == batch_size


@pytest.mark.parametrize("mode", AGGREGATION_MODES)
def test_aggregate_micro_batches_sum_to_full_batch(mode):
    logp, _, _, _, _, mask = random_batch(0)
    totals = {"num_tokens_total": float(mask.sum()), "num_sequences_total": mask.shape[0]}
    constant = 7.0 * mask.shape[0]
    full = aggregate(logp, mask, mode, constant, **totals)
    parts = [
        aggregate(logp[rows, :width], mask[rows, :width], mode, constant, **totals)
        for rows, width in split(6, mask, [2, 3, 1])
    ]
    close(torch.stack(parts).sum(), full.item())


@pytest.mark.parametrize("mode", AGGREGATION_MODES)
def test_grpo_loss_micro_batches_match_full_batch(mode):
    logp, old_logp, ref_logp, entropy, advantages, mask = random_batch(1)
    kwargs = dict(
        kl_beta=0.1,
        entropy_coef=0.01,
        mode=mode,
        constant=7.0 * 6,
        num_tokens_total=float(mask.sum()),
        num_sequences_total=6,
    )
    full, full_stats = grpo_loss(logp, old_logp, ref_logp, advantages, mask, entropy=entropy, **kwargs)
    full_grad = torch.autograd.grad(full, logp)[0]

    total = torch.zeros(())
    summed_stats: dict[str, float] = {}
    micro_grad = torch.zeros_like(logp)
    for rows, width in split(6, mask, [4, 2]):
        leaf = logp.detach()[rows, :width].requires_grad_(True)
        loss, stats = grpo_loss(
            leaf,
            old_logp[rows, :width],
            ref_logp[rows, :width],
            advantages[rows],
            mask[rows, :width],
            entropy=entropy.detach()[rows, :width],
            **kwargs,
        )
        loss.backward()
        micro_grad[rows, :width] = leaf.grad
        total = total + loss.detach()
        for key, value in stats.items():
            summed_stats[key] = summed_stats.get(key, 0.0) + value
    close(total, full.item())
    close(micro_grad, full_grad)
    assert summed_stats.keys() == full_stats.keys()
    for key, value in full_stats.items():
        assert summed_stats[key] == pytest.approx(value, abs=ATOL), key


# grpo_loss


def test_grpo_loss_hand_value():
    logp = torch.zeros(2, 2, requires_grad=True)
    ref_logp = torch.full((2, 2), -math.log(2))  # k3 per token: 0.5 + ln 2 - 1
    mask = torch.tensor([[1, 1], [1, 0]])
    entropy = torch.tensor([[1.0, 2.0], [3.0, 9.0]])
    loss, stats = grpo_loss(
        logp,
        logp.detach(),
        ref_logp,
        torch.tensor([1.0, -3.0]),
        mask,
        kl_beta=0.1,
        entropy_coef=0.01,
        entropy=entropy,
    )
    # rho = 1: per-token policy loss -A = [-1, -1, 3] -> 1/3
    kl = math.log(2) - 0.5
    close(loss.detach(), 1 / 3 + 0.1 * kl - 0.01 * 2.0)
    assert stats == pytest.approx(
        {"policy_loss": 1 / 3, "kl": kl, "entropy": 2.0, "clip_fraction": 0.0, "loss": loss.item()}, abs=ATOL
    )
    loss.backward()
    # d/dlogp: -A / 3 from the policy term, 0.1 * (1 - exp(ref - logp)) / 3 = 0.1 * 0.5 / 3 from k3
    close(logp.grad, [[-1 / 3 + 0.05 / 3, -1 / 3 + 0.05 / 3], [1.0 + 0.05 / 3, 0.0]])


def test_grpo_loss_equal_reward_group_has_zero_gradient():
    rewards = torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0, 2.0, -0.1, 1.5])
    advantages = group_advantages(rewards, group_size=4)
    torch.manual_seed(4)
    logp = (-torch.rand(8, 5)).requires_grad_(True)
    old_logp = logp.detach() + torch.randn(8, 5) * 0.1
    mask = torch.ones(8, 5)
    mask[1, 3:] = 0
    loss, stats = grpo_loss(logp, old_logp, None, advantages, mask, kl_beta=0.0)
    loss.backward()
    assert torch.equal(logp.grad[:4], torch.zeros(4, 5))
    assert logp.grad[4:].abs().sum() > 0
    assert set(stats) == {"policy_loss", "clip_fraction", "loss"}


def test_grpo_loss_validates_optional_inputs():
    logp = torch.zeros(1, 2)
    mask = torch.ones(1, 2)
    with pytest.raises(ValueError, match="ref_logp"):
        grpo_loss(logp, logp, None, torch.ones(1), mask)
    with pytest.raises(ValueError, match="entropy"):
        grpo_loss(logp, logp, logp, torch.ones(1), mask, entropy_coef=0.001)
