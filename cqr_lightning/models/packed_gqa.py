"""Attention for one new token a row under grouped-query attention, reading each key/value head once.

With grouped-query attention (Qwen2.5: 16 query heads sharing 2 key/value heads) transformers' `sdpa` attention
copies every key/value head once per query head that shares it (`repeat_kv`) before calling
`scaled_dot_product_attention` whenever there is a mask (5.17), and inside `torch.compile` even in versions that
avoid the copy for one query token when run eagerly (5.23), so in the compiled decoding step. While decoding, that
copy is the largest tensor work of a token: the whole cache, written eight times over, every layer, every token
(bench/RESULTS.md, "Seventeenth session: where a decoding step's GPU time goes"). For a single query token the
copy is not needed: the query heads of one group can stand in for query positions of their key/value head, so
`[B, heads, 1, D]` becomes `[B, kv_heads, group, D]` and attention runs on the cache as stored. The arithmetic is
the same; only which tensor holds the group changes.

`packed_gqa(model)` switches a model from `sdpa` to this implementation for the duration of a block (the decoding
loop); every other call (prefill, several query tokens, no grouping) goes to transformers' own `sdpa` function, and
the masks are `sdpa`'s.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

PACKED_GQA = "cqr_packed_gqa_sdpa"


def packed_gqa_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function contract: query [B, H, Q, D], key/value [B, H_kv, L, D], mask broadcastable
    to [B, H, Q, L]; returns [B, Q, H, D]. One query token with grouped heads is computed packed; anything else by
    `sdpa_attention_forward`."""
    groups = getattr(module, "num_key_value_groups", 1)
    batch, heads, q_length, dim = query.shape
    extras = any(kwargs.get(name) is not None for name in ("position_bias", "softcap", "s_aux"))  # terms sdpa lacks
    packable = q_length == 1 and groups > 1 and dropout == 0.0 and not extras
    if not packable or (attention_mask is not None and attention_mask.shape[1] not in (1, heads)):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)  # fmt: skip
    packed = query.reshape(batch, heads // groups, groups, dim)  # the group's heads as query positions
    mask = attention_mask  # [B or 1, 1, 1, L] broadcasts as it is; one mask a head is grouped like the heads
    if mask is not None and mask.shape[1] == heads:
        mask = mask.reshape(mask.shape[0], heads // groups, groups, -1)
    out = F.scaled_dot_product_attention(packed, key, value, attn_mask=mask, scale=scaling)  # [B, H_kv, group, D]
    return out.reshape(batch, heads, 1, dim).transpose(1, 2).contiguous(), None


AttentionInterface.register(PACKED_GQA, packed_gqa_attention)
AttentionMaskInterface.register(PACKED_GQA, sdpa_mask)


@contextlib.contextmanager
def packed_gqa(model) -> Iterator[bool]:
    """Within the block, a model that uses `sdpa` attention uses `packed_gqa_attention` (yields True); a model with
    another implementation (eager, flash) is left alone (yields False). Restored on exit, errors included."""
    config = model.config
    before = config._attn_implementation
    if before != "sdpa":
        yield False
        return
    config._attn_implementation = PACKED_GQA
    try:
        yield True
    finally:
        config._attn_implementation = before
