"""Grouped-query attention for one query token, packed (cqr_lightning/models/packed_gqa.py), against transformers' own
`sdpa` attention function, and its use inside the decoding loop."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

from cqr_lightning.models.decode_loop import decode
from cqr_lightning.models.loading import load_policy, load_tokenizer
from cqr_lightning.models.packed_gqa import PACKED_GQA, packed_gqa, packed_gqa_attention


class _Attention(torch.nn.Module):
    def __init__(self, groups: int):
        super().__init__()
        self.num_key_value_groups = groups
        self.is_causal = True


def _tensors(batch=3, kv_heads=2, groups=4, q_length=1, length=11, dim=8):
    generator = torch.Generator().manual_seed(0)
    query = torch.randn(batch, kv_heads * groups, q_length, dim, generator=generator)
    key = torch.randn(batch, kv_heads, length, dim, generator=generator)
    value = torch.randn(batch, kv_heads, length, dim, generator=generator)
    return query, key, value


@pytest.mark.parametrize("mask_kind", ["none", "shared", "per_head"])
def test_one_query_token_attends_as_with_each_key_value_head_copied_per_query_head(mask_kind):
    query, key, value = _tensors()
    batch, heads, _, _ = query.shape
    length = key.shape[2]
    mask = None
    if mask_kind == "shared":  # left padding: row 1 starts at position 3, row 2 at position 6
        mask = torch.ones(batch, 1, 1, length, dtype=torch.bool)
        mask[1, ..., :3] = False
        mask[2, ..., :6] = False
    elif mask_kind == "per_head":
        mask = torch.rand(batch, heads, 1, length, generator=torch.Generator().manual_seed(1)) > 0.3
        mask[..., -1] = True  # every head sees at least one position
    module = _Attention(groups=4)
    copied = {"key": repeat_kv(key, 4), "value": repeat_kv(value, 4)}  # each key/value head once per query head
    expected = F.scaled_dot_product_attention(query, **copied, attn_mask=mask, scale=0.3).transpose(1, 2)
    ours, weights = packed_gqa_attention(module, query, key, value, mask, scaling=0.3)
    assert weights is None
    assert ours.shape == expected.shape == (batch, 1, heads, query.shape[-1])
    torch.testing.assert_close(ours, expected)


def test_several_query_tokens_ungrouped_heads_and_softcaps_go_to_sdpa_unchanged():
    module = _Attention(groups=4)
    query, key, value = _tensors(q_length=5, length=5)
    expected, _ = sdpa_attention_forward(module, query, key, value, None)
    assert torch.equal(packed_gqa_attention(module, query, key, value, None)[0], expected)
    query, key, value = _tensors(kv_heads=8, groups=1)
    plain = _Attention(groups=1)
    expected, _ = sdpa_attention_forward(plain, query, key, value, None)
    assert torch.equal(packed_gqa_attention(plain, query, key, value, None)[0], expected)
    query, key, value = _tensors()
    with pytest.raises(ValueError, match="softcap"):  # sdpa's own refusal, not a silently dropped softcap
        packed_gqa_attention(module, query, key, value, None, softcap=30.0)


def test_the_block_switches_sdpa_models_restores_them_on_errors_and_leaves_others_alone(tiny_model_cfg):
    model = load_policy(tiny_model_cfg)
    assert model.config._attn_implementation == "sdpa"
    with pytest.raises(RuntimeError, match="inside"):
        with packed_gqa(model) as switched:
            assert switched and model.config._attn_implementation == PACKED_GQA
            raise RuntimeError("inside")
    assert model.config._attn_implementation == "sdpa"
    model.config._attn_implementation = "eager"
    with packed_gqa(model) as switched:
        assert not switched and model.config._attn_implementation == "eager"


def test_the_decoding_loop_attends_packed_for_new_tokens_and_restores_sdpa(tiny_model_cfg):
    model = load_policy(tiny_model_cfg)
    tokenizer = load_tokenizer(tiny_model_cfg)
    assert model.config.num_attention_heads > model.config.num_key_value_heads  # the tiny model groups its heads
    seen = []  # (query tokens, attention implementation) of each call of the first layer's attention

    def record(module, args, kwargs, out):
        seen.append((kwargs["hidden_states"].shape[1], module.config._attn_implementation))

    attention = next(m for name, m in model.named_modules() if name.endswith("layers.0.self_attn"))
    hook = attention.register_forward_hook(record, with_kwargs=True)
    batch = tokenizer(["Query: when did she die?", "Rewrite:"], return_tensors="pt", padding=True)
    try:
        decode(model, batch["input_ids"], batch["attention_mask"], max_new_tokens=4, eos_ids=[10**6], pad_id=0)
    finally:
        hook.remove()
    assert [length for length, _ in seen[1:]] == [1, 1, 1]  # the prefill, then one token a step
    assert {implementation for _, implementation in seen} == {PACKED_GQA}
    assert model.config._attn_implementation == "sdpa"
