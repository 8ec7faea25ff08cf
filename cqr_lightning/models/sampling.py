"""Next-token choice for our own decoding loop: the distribution transformers' `generate` samples from, computed on
the GPU without a host synchronization.

`filtered_logits` applies, in transformers' order, the temperature, top-k and top-p filters (the same cut-offs as its
`TemperatureLogitsWarper`, `TopKLogitsWarper` and `TopPLogitsWarper`), so the tokens sampled follow the distribution
the GRPO loss assumes. `next_tokens` draws from it by an exponential race (the index of the largest p_i / E_i with
E_i ~ Exp(1) is distributed as p), which needs no sort and no `multinomial`.
"""

from __future__ import annotations

import torch


def filtered_logits(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """`logits` [B, V] scaled by 1 / `temperature`, with the tokens outside the top `top_k` (0: no cut) and outside
    the smallest set whose probability reaches `top_p` (1.0: no cut) set to -inf. At least one token always stays."""
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    scores = logits.float() / temperature  # [B, V]
    if 0 < top_k < scores.shape[-1]:
        kth = torch.topk(scores, top_k, dim=-1).values[..., -1:]  # [B, 1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p < 1.0:
        ascending, order = torch.sort(scores, dim=-1)
        cumulative = ascending.softmax(dim=-1).cumsum(dim=-1)
        drop = cumulative <= (1.0 - top_p)
        drop[..., -1] = False  # the most probable token stays
        scores = scores.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return scores


def next_tokens(
    logits: torch.Tensor,
    *,
    do_sample: bool,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """One token per row of `logits` [B, V]: the argmax without sampling, else a draw from `filtered_logits`. [B]"""
    if not do_sample:
        return logits.argmax(dim=-1)
    probs = filtered_logits(logits, temperature, top_k, top_p).softmax(dim=-1)  # [B, V]
    race = torch.empty_like(probs).exponential_(generator=generator).clamp_min_(torch.finfo(probs.dtype).tiny)
    return (probs / race).argmax(dim=-1)
