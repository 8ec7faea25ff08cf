"""The fast sampling path: a bf16 copy with LoRA merged must give the policy's logits (bf16 tolerance)."""

from __future__ import annotations

import pytest
import torch

from cqr_lightning.models.loading import load_policy, load_tokenizer
from cqr_lightning.models.merged_sampler import MergedSampler

TEXT = "<|im_start|>user\nQuery: how tall is it?\nRewrite:<|im_end|>\n<|im_start|>assistant\n<rewrite> how tall"


@pytest.fixture()
def policy(tiny_model_cfg):
    torch.manual_seed(0)
    model = load_policy(tiny_model_cfg)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.2)  # a policy that differs from its base
    return model.eval()


def logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def assert_same_distribution(policy, sampler: MergedSampler, ids) -> None:
    """bf16 tolerance, measured: the fast copy may stray from the exact (float32) merged function by no more
    than the 4-bit policy's own bf16 arithmetic does, and the two sampling distributions nearly coincide."""
    exact = logits(MergedSampler(policy, dtype=torch.float32).model, ids)
    reference, fast = logits(policy, ids), logits(sampler.model, ids)
    policy_error = (reference - exact).abs().max()
    assert (fast - exact).abs().max() <= 2 * policy_error + 1e-3
    p, q = reference.log_softmax(-1), fast.log_softmax(-1)
    assert (p.exp() * (p - q)).sum(-1).mean() < 2e-3  # KL(policy || fast) per token
    assert (fast.argmax(-1) == reference.argmax(-1)).float().mean() >= 0.9


def test_merged_copy_gives_the_policy_logits(policy, tiny_model_cfg):
    tokenizer = load_tokenizer(tiny_model_cfg)
    ids = tokenizer(TEXT, return_tensors="pt", add_special_tokens=False)["input_ids"]
    sampler = MergedSampler(policy)
    assert not any(p.requires_grad for p in sampler.model.parameters())
    assert_same_distribution(policy, sampler, ids)
    with policy.disable_adapter():
        base = logits(policy, ids)
    assert (logits(sampler.model, ids) - base).abs().max() > 0.03 * base.abs().max(), "the LoRA delta is merged in"


def test_sync_follows_an_optimizer_step(policy, tiny_model_cfg):
    tokenizer = load_tokenizer(tiny_model_cfg)
    ids = tokenizer(TEXT, return_tensors="pt", add_special_tokens=False)["input_ids"]
    sampler = MergedSampler(policy)
    stale = logits(sampler.model, ids)
    with torch.no_grad():
        for name, param in policy.named_parameters():
            if "lora_A" in name:
                param.add_(torch.randn_like(param) * 0.3)
    after_step = logits(policy, ids)
    assert (stale - after_step).abs().max() > 0.03 * after_step.abs().max()
    sampler.sync()
    assert_same_distribution(policy, sampler, ids)


def test_release_frees_the_merged_linears_and_sync_rebuilds_them_exactly(policy, tiny_model_cfg):
    tokenizer = load_tokenizer(tiny_model_cfg)
    ids = tokenizer(TEXT, return_tensors="pt", add_special_tokens=False)["input_ids"]
    sampler = MergedSampler(policy)
    before = logits(sampler.model, ids)
    merged_elements = sum(sampler.model.get_submodule(name).weight.numel() for name in sampler.lora_layers)
    total_elements = sum(p.numel() for p in sampler.model.parameters())
    sampler.release()
    assert sampler.released
    assert all(sampler.model.get_submodule(name).weight.numel() == 0 for name in sampler.lora_layers)
    assert sum(p.numel() for p in sampler.model.parameters()) == total_elements - merged_elements
    sampler.sync()
    assert not sampler.released
    assert torch.equal(logits(sampler.model, ids), before), "rebuilt from the same policy: the same weights"
