"""GRPO loss pieces: group-relative advantages, token log-probs, the clipped surrogate, k3 KL and aggregation.

Shapes: B responses (prompts x group size, group-contiguous), L response tokens, V vocabulary entries.
`mask` is 1 (or True) on response tokens and 0 on padding. Every function is pure: no module state, no
in-place changes to its inputs.

Micro-batching: when one optimiser step accumulates gradients over several micro-batches, pass the whole
batch's `num_tokens_total` (and `num_sequences_total`) to `aggregate` / `grpo_loss` for every micro-batch.
The micro-batch losses (and their gradients) then add up exactly to the loss of the full batch.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

AGGREGATION_MODES = ("token_mean", "sequence_mean", "constant")


ADVANTAGE_SCALES = ("group", "pooled", "none")


def advantage_scale_name(scale: str | bool) -> str:
    """`rl.scale_advantages` as one of ADVANTAGE_SCALES; true and false, its older values, mean group and none."""
    if isinstance(scale, bool):
        return "group" if scale else "none"
    if scale not in ADVANTAGE_SCALES:
        raise ValueError(f"rl.scale_advantages must be one of {', '.join(ADVANTAGE_SCALES)}, got {scale!r}")
    return scale


def group_advantages(
    rewards: Tensor,
    group_size: int,
    eps: float = 1e-6,
    scale: str | bool = "group",
    reduce_sum: Callable[[float], float] | None = None,
) -> Tensor:
    """Advantage of each response relative to the other responses to the same prompt.

    `rewards` is [B * G] with each prompt's G responses next to each other. Each reward is centred on its group's
    mean, then divided according to `scale`:
    - "group" (GRPO): by its group's sample (unbiased, n - 1) standard deviation + eps, torch's default and what
      the reference verl implementation uses. A group whose rewards differ only by a small term then gets
      advantages as large as a group whose ranks differ.
    - "pooled": by one standard deviation for the whole batch, the root mean square of the centred rewards of the
      groups that are not flat (+ eps), so a group keeps its spread relative to the others: a tie-breaking term
      stays a tie-breaker, and the scale does not grow with the share of flat groups. `reduce_sum` sums a float
      over DDP processes, making the scale the global batch's.
    - "none": Dr. GRPO's mean-only centring.
    True and False mean "group" and "none". A group whose rewards are all equal gets exactly zero advantage.
    """
    scale = advantage_scale_name(scale)
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D [B * G], got shape {tuple(rewards.shape)}")
    if group_size < 2:
        raise ValueError(f"group_size must be >= 2 to compare responses, got {group_size}")
    if rewards.numel() % group_size != 0:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    if not torch.is_floating_point(rewards):
        rewards = rewards.float()
    groups = rewards.reshape(-1, group_size)  # [B, G]
    centred = groups - groups.mean(dim=-1, keepdim=True)  # [B, G]
    flat = groups.amax(dim=-1, keepdim=True) == groups.amin(dim=-1, keepdim=True)  # [B, 1]
    centred = centred.masked_fill(flat, 0.0)
    if scale == "group":
        centred = centred / (groups.std(dim=-1, keepdim=True) + eps)
    elif scale == "pooled":
        total = reduce_sum or (lambda value: value)
        squares, count = total(float(centred.square().sum())), total(float((~flat).sum() * group_size))
        centred = centred / (math.sqrt(squares / count) + eps) if count else centred
    return centred.reshape(-1)  # [B * G]


def _fp32_rows(logits: Tensor) -> list[Tensor]:
    """Each sequence's logits [L, V] in at least float32, one row at a time to bound peak memory."""
    dtype = torch.promote_types(logits.dtype, torch.float32)
    return [row.to(dtype) for row in logits]


def token_log_probs(logits: Tensor, labels: Tensor) -> Tensor:
    """log p(labels[b, t]) under softmax(logits[b, t]), in float32 (float64 stays float64).

    `labels[b, t]` is the token scored by `logits[b, t]` (shift beforehand; divide the logits by the
    sampling temperature beforehand if wanted). Only the label's logit is gathered and a logsumexp is
    taken per sequence, so no full [B, L, V] log-softmax is built. Positions with a negative label
    (e.g. -100 padding) give 0.0; mask them out downstream.
    """
    if logits.shape[:-1] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} do not match labels {tuple(labels.shape)}")
    safe_labels = labels.clamp(min=0)  # [B, L]
    out = []
    for row, row_labels in zip(_fp32_rows(logits), safe_labels, strict=True):
        picked = row.gather(-1, row_labels.unsqueeze(-1)).squeeze(-1)  # [L]
        out.append(picked - torch.logsumexp(row, dim=-1))  # [L]
    logp = torch.stack(out)  # [B, L]
    return logp.masked_fill(labels < 0, 0.0)


def token_entropy(logits: Tensor) -> Tensor:
    """Entropy of softmax(logits) at every position, [B, L], in float32 and one sequence at a time."""
    out = []
    for row in _fp32_rows(logits):
        lse = torch.logsumexp(row, dim=-1, keepdim=True)  # [L, 1]
        probs = torch.exp(row - lse)  # [L, V]
        out.append(lse.squeeze(-1) - (probs * row).sum(dim=-1))  # [L]
    return torch.stack(out)  # [B, L]


def k3_kl(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """Per-token k3 estimate of KL(policy || reference): exp(d) - d - 1 with d = ref_logp - logp.

    Elementwise, >= 0, and zero where the two log-probs are equal. The reference is never differentiated.
    """
    diff = ref_logp.detach() - logp
    return torch.exp(diff) - diff - 1.0


def _per_token_advantages(advantages: Tensor, like: Tensor) -> Tensor:
    """Advantages as [B, L]: a [B] tensor is repeated over every token of its response."""
    if advantages.shape == like.shape:
        return advantages
    if advantages.dim() == 1 and like.dim() == 2 and advantages.shape[0] == like.shape[0]:
        return advantages.unsqueeze(-1)  # [B, 1]
    raise ValueError(
        f"advantages must be [B] or [B, L] for log-probs {tuple(like.shape)}, got {tuple(advantages.shape)}"
    )


def _surrogate(
    logp: Tensor, old_logp: Tensor, advantages: Tensor, clip_eps: float, clip_eps_high: float | None
) -> tuple[Tensor, Tensor]:
    """Per-token clipped policy loss [B, L] and where the clipped branch is the one taken [B, L] (bool)."""
    high = clip_eps if clip_eps_high is None else clip_eps_high
    adv = _per_token_advantages(advantages.detach(), logp)  # [B, L] or [B, 1]
    ratio = torch.exp(logp - old_logp.detach())  # [B, L]
    unclipped = ratio * adv  # [B, L]
    clipped = ratio.clamp(1.0 - clip_eps, 1.0 + high) * adv  # [B, L]
    return -torch.minimum(unclipped, clipped), clipped < unclipped


def clipped_surrogate(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    clip_eps: float = 0.2,
    clip_eps_high: float | None = None,
    mask: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """PPO's clipped objective as a per-token loss: -min(rho * A, clip(rho, 1 - eps, 1 + eps_high) * A).

    rho = exp(logp - old_logp); `clip_eps_high` (DAPO's clip-higher) defaults to `clip_eps`. Where the
    clipped branch is taken the token has zero gradient. Returns the loss [B, L] and the fraction of
    tokens (of the `mask`ed ones when given) on which the clip was active.
    """
    per_token, was_clipped = _surrogate(logp, old_logp, advantages, clip_eps, clip_eps_high)
    if mask is None:
        return per_token, was_clipped.float().mean()
    return per_token, aggregate(was_clipped.float(), mask, "token_mean")


def aggregate(
    per_token: Tensor,
    mask: Tensor,
    mode: str,
    constant: float | None = None,
    *,
    num_tokens_total: float | None = None,
    num_sequences_total: float | None = None,
) -> Tensor:
    """Reduce a per-token quantity [B, L] over the masked tokens to a scalar.

    - "token_mean": sum over all masked tokens / number of masked tokens (ConvSearch-R1's choice);
    - "sequence_mean": mean over the tokens of each sequence, then mean over sequences;
    - "constant": sum over all masked tokens / `constant` (Dr. GRPO; e.g. max response length x batch).

    For a micro-batch of a larger batch, `num_tokens_total` ("token_mean") and `num_sequences_total`
    ("sequence_mean") replace this micro-batch's own counts with the whole batch's, so that the
    micro-batch results sum to the full-batch result. "constant" sums that way already. Normalisers that
    do not apply to `mode` are ignored. Values at padded positions (even nan) do not reach the result.
    """
    if mode not in AGGREGATION_MODES:
        raise ValueError(f"unknown aggregation mode {mode!r}; valid modes: {', '.join(AGGREGATION_MODES)}")
    if per_token.shape != mask.shape:
        raise ValueError(f"per-token values {tuple(per_token.shape)} do not match mask {tuple(mask.shape)}")
    for name, value in (
        ("constant", constant),
        ("num_tokens_total", num_tokens_total),
        ("num_sequences_total", num_sequences_total),
    ):
        if value is not None and value <= 0:
            raise ValueError(f"{name} must be positive, got {value}")
    keep = mask.bool()  # [B, L]
    masked = torch.where(keep, per_token, torch.zeros_like(per_token))  # [B, L]
    if mode == "token_mean":
        count = keep.sum().clamp(min=1) if num_tokens_total is None else num_tokens_total
        return masked.sum() / count
    if mode == "sequence_mean":
        seq_means = masked.sum(dim=-1) / keep.sum(dim=-1).clamp(min=1)  # [B]
        count = max(per_token.shape[0], 1) if num_sequences_total is None else num_sequences_total
        return seq_means.sum() / count
    if constant is None:
        raise ValueError('aggregation mode "constant" needs `constant` (e.g. max response length x batch)')
    return masked.sum() / constant


def grpo_loss(
    logp: Tensor,
    old_logp: Tensor,
    ref_logp: Tensor | None,
    advantages: Tensor,
    mask: Tensor,
    *,
    clip_eps: float = 0.2,
    clip_eps_high: float | None = None,
    kl_beta: float = 0.001,
    entropy_coef: float = 0.0,
    entropy: Tensor | None = None,
    mode: str = "token_mean",
    constant: float | None = None,
    num_tokens_total: float | None = None,
    num_sequences_total: float | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """GRPO loss: clipped surrogate + kl_beta * k3 KL - entropy_coef * entropy, each aggregated by `mode`.

    `logp`, `old_logp`, `ref_logp` and `entropy` are [B, L]; `advantages` is [B] or [B, L]. Only `logp`
    (and `entropy`) carry gradients. `ref_logp` may be None only when `kl_beta` is 0, `entropy` only when
    `entropy_coef` is 0. Stats: loss, policy_loss, kl and entropy (when given), clip_fraction (fraction
    of masked tokens clipped). With the micro-batch normalisers every stat, like the loss, sums over the
    micro-batches of a step (clip_fraction through `num_tokens_total`).
    """
    if ref_logp is None and kl_beta != 0:
        raise ValueError(f"kl_beta={kl_beta} needs ref_logp (set kl_beta=0 to train without a reference)")
    if entropy is None and entropy_coef != 0:
        raise ValueError(f"entropy_coef={entropy_coef} needs the per-token entropy")

    def reduce(values: Tensor) -> Tensor:
        return aggregate(
            values,
            mask,
            mode,
            constant,
            num_tokens_total=num_tokens_total,
            num_sequences_total=num_sequences_total,
        )

    per_token, was_clipped = _surrogate(logp, old_logp, advantages, clip_eps, clip_eps_high)
    policy_loss = reduce(per_token)
    loss = policy_loss
    stats = {"policy_loss": policy_loss.item()}
    if ref_logp is not None:
        kl = reduce(k3_kl(logp, ref_logp))
        loss = loss + kl_beta * kl
        stats["kl"] = kl.item()
    if entropy is not None:
        mean_entropy = reduce(entropy)
        loss = loss - entropy_coef * mean_entropy
        stats["entropy"] = mean_entropy.item()
    clip_fraction = aggregate(was_clipped.float(), mask, "token_mean", num_tokens_total=num_tokens_total)
    stats["clip_fraction"] = clip_fraction.item()
    stats["loss"] = loss.item()
    return loss, stats
