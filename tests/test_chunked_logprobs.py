"""Chunked log-probs (rl.logprob_chunk_size) against the full-logits path, on the tiny model: with real 4-bit layers
computing in bfloat16 (the shipped setting) and without quantisation in float32.

Tolerances: log-probs, entropies and losses within 1e-5 absolute on both models (the head runs in float32; the
two paths differ only in how its matmul and the reductions are blocked). LoRA gradients within 1e-5 absolute in
float32; in bfloat16 compute, where those last-bit differences pass through bfloat16 layers, within 1% of each
gradient's norm (bfloat16 keeps 8 significant bits: 0.4% per rounding).
"""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf
from test_rl import BAD, GOOD, ScriptedScorer, fit, lora_state, policy_with_random_lora_b, scripted_module
from transformers import LlamaConfig, LlamaForCausalLM

from cqr_lightning.grpo.chunked_logprobs import decoder_and_head
from cqr_lightning.grpo.losses import grpo_loss
from cqr_lightning.grpo.rollout import pack_rollout, response_log_probs
from cqr_lightning.models.loading import load_tokenizer
from cqr_lightning.modules.rl import RLModule

ATOL = 1e-5
TEMPERATURE = 0.7


def float32_cfg(cfg):
    return OmegaConf.merge(cfg, {"load_in_4bit": False, "compute_dtype": "float32"})


@pytest.fixture(scope="module", params=["4-bit bfloat16", "float32"], name="policy")
def two_dtype_policy(request, tiny_model_cfg):
    cfg = tiny_model_cfg if request.param == "4-bit bfloat16" else float32_cfg(tiny_model_cfg)
    return policy_with_random_lora_b(cfg, seed=3)


@pytest.fixture(scope="module")
def rollout(tiny_model_cfg):
    """Six sequences with prompts and responses of different lengths (left and right padding both present)."""
    generator = torch.Generator().manual_seed(0)
    vocab = load_tokenizer(tiny_model_cfg).vocab_size
    prompts = [torch.randint(5, vocab, (n,), generator=generator).tolist() for n in (7, 12, 9, 12, 3, 10)]
    responses = [torch.randint(5, vocab, (n,), generator=generator).tolist() for n in (5, 11, 1, 8, 11, 6)]
    return pack_rollout(prompts, responses, pad_id=3)


def masked(values: torch.Tensor, rollout) -> torch.Tensor:
    return values[rollout.response_mask.bool()]


def lora_gradients(policy) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in policy.named_parameters() if p.requires_grad}


def loss_and_gradients(policy, rollout, chunk_size, shared_prompts: bool = False):
    """The GRPO loss (KL and entropy terms on) of one micro-batch of six rows, backpropagated into the LoRA weights."""
    policy.train()
    policy.zero_grad(set_to_none=True)
    options = {"chunk_size": chunk_size, "shared_prompts": shared_prompts}
    with torch.no_grad(), policy.disable_adapter():
        ref_logp, _ = response_log_probs(policy, rollout, TEMPERATURE, **options)
    logp, entropy = response_log_probs(policy, rollout, TEMPERATURE, with_entropy=True, **options)
    advantages = torch.tensor([1.0, -0.5, 0.25, -1.0, 0.5, -0.25])
    old_logp = logp.detach() + 0.05 * torch.arange(logp.numel()).reshape(logp.shape).sin()  # ratios != 1, some clipped
    loss, _ = grpo_loss(
        logp, old_logp, ref_logp, advantages, rollout.response_mask, kl_beta=0.1, entropy_coef=0.01, entropy=entropy
    )
    loss.backward()
    return logp.detach(), entropy.detach(), ref_logp, loss.detach(), lora_gradients(policy)


@pytest.mark.parametrize("chunk_size", [1, 4, 1000])
def test_chunked_path_gives_the_full_paths_values_and_gradients(policy, rollout, chunk_size):
    assert_same_values_and_gradients(
        policy, rollout, loss_and_gradients(policy, rollout, None), loss_and_gradients(policy, rollout, chunk_size)
    )


def assert_same_values_and_gradients(policy, rollout, full, other):
    """`loss_and_gradients` results agree within the tolerances of this file's docstring."""
    for name, a, b in zip(("log-probs", "entropy", "reference log-probs"), full[:3], other[:3], strict=True):
        torch.testing.assert_close(masked(b, rollout), masked(a, rollout), atol=ATOL, rtol=0, msg=name)
    torch.testing.assert_close(other[3], full[3], atol=ATOL, rtol=0)
    assert full[4].keys() == other[4].keys() and len(full[4]) > 0
    bfloat16 = policy.get_base_model().model.layers[0].self_attn.q_proj.base_layer.weight.dtype == torch.uint8
    for name, grad in full[4].items():
        assert grad.norm() > 0, f"{name} has no gradient: the comparison would be empty"
        if bfloat16:
            assert (other[4][name] - grad).norm() <= 0.01 * grad.norm(), name
        else:
            torch.testing.assert_close(other[4][name], grad, atol=ATOL, rtol=0, msg=name)


def test_temperature_changes_the_chunked_values_as_it_changes_the_full_ones(policy, rollout):
    with torch.no_grad():
        at_one, _ = response_log_probs(policy, rollout, 1.0, chunk_size=4)
        full_at_one, _ = response_log_probs(policy, rollout, 1.0)
        at_temperature, _ = response_log_probs(policy, rollout, TEMPERATURE, chunk_size=4)
    torch.testing.assert_close(masked(at_one, rollout), masked(full_at_one, rollout), atol=ATOL, rtol=0)
    assert (masked(at_one, rollout) - masked(at_temperature, rollout)).abs().max() > 1e-3


def test_grpo_steps_with_chunked_log_probs_train_the_same(tiny_model_cfg, data_cfg, tmp_path):
    tokenizer = load_tokenizer(tiny_model_cfg)
    trained = {}
    for chunk_size in (None, 5):
        policy = policy_with_random_lora_b(float32_cfg(tiny_model_cfg), seed=1)
        module = scripted_module(
            policy, tokenizer, [GOOD, BAD, GOOD, BAD], kl_beta=0.01, entropy_coef=0.01, micro_batch_size=3,
            updates_per_rollout=2, temperature=TEMPERATURE, logprob_chunk_size=chunk_size,
        )  # fmt: skip
        trainer = fit(module, data_cfg, [ScriptedScorer({GOOD: 2.0, BAD: 0.0})], 2, tmp_path)
        trained[chunk_size] = (lora_state(policy), {k: float(v) for k, v in trainer.callback_metrics.items()})
    (full_weights, full_metrics), (chunked_weights, chunked_metrics) = trained[None], trained[5]
    for name, weight in full_weights.items():
        torch.testing.assert_close(chunked_weights[name], weight, atol=ATOL, rtol=0, msg=name)
    for key in ("train/loss", "train/kl", "train/entropy", "train/grad_norm"):
        assert chunked_metrics[key] == pytest.approx(full_metrics[key], abs=ATOL), key


def test_models_that_transform_their_logits_are_refused():
    config = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2)  # fmt: skip
    config.final_logit_softcapping = 30.0
    with pytest.raises(ValueError, match="final_logit_softcapping.*rl.logprob_chunk_size=null"):
        decoder_and_head(LlamaForCausalLM(config))


def test_a_chunk_size_below_one_is_refused(policy, tiny_model_cfg):
    with pytest.raises(ValueError, match="rl.logprob_chunk_size must be a positive"):
        RLModule(policy, load_tokenizer(tiny_model_cfg), logprob_chunk_size=0)
