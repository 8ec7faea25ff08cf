"""Loss passes that run each prompt once for its group (rl.shared_prompt_passes): the packed layout on rows of known
prompts and responses, and the same log-probs, entropies, loss and LoRA gradients as the plain path on the tiny model
(4-bit in bfloat16 and float32, tolerances as tests/test_chunked_logprobs.py states them), and the same training."""

from __future__ import annotations

import pytest
import torch
from test_chunked_logprobs import (
    ATOL,
    TEMPERATURE,
    assert_same_values_and_gradients,
    float32_cfg,
    loss_and_gradients,
    masked,
    two_dtype_policy,  # noqa: F401  (the `policy` fixture: the tiny policy in 4-bit bfloat16 and in float32)
)
from test_rl import BAD, GOOD, ScriptedScorer, fit, lora_state, policy_with_random_lora_b, scripted_module

from cqr_lightning.grpo.rollout import pack_rollout, response_log_probs
from cqr_lightning.grpo.shared_prompts import shared_prompt_layout
from cqr_lightning.models.loading import load_tokenizer


@pytest.fixture(scope="module")
def grouped_rollout(tiny_model_cfg):
    """Six rows from three prompts (9 tokens three times, 4 twice, 12 once), responses of 5, 11, 1, 8, 3, 6 tokens."""
    generator = torch.Generator().manual_seed(0)
    vocab = load_tokenizer(tiny_model_cfg).vocab_size
    first, second, third = (torch.randint(5, vocab, (n,), generator=generator).tolist() for n in (9, 4, 12))
    prompts = [first, first, first, second, second, third]
    responses = [torch.randint(5, vocab, (n,), generator=generator).tolist() for n in (5, 11, 1, 8, 3, 6)]
    return pack_rollout(prompts, responses, pad_id=3)


def test_rows_with_one_prompt_share_a_packed_row_and_see_only_the_prompt_and_their_own_tokens():
    # rows 0 and 2 share the prompt [10, 11, 12]; row 1's prompt [20, 21] is its own
    rollout = pack_rollout([[10, 11, 12], [20, 21], [10, 11, 12]], [[30, 31], [40], [50, 51, 52]], pad_id=0)
    layout = shared_prompt_layout(rollout)
    assert layout.input_ids.tolist() == [[10, 11, 12, 30, 31, 50, 51, 52], [20, 21, 40, 0, 0, 0, 0, 0]]
    assert layout.position_ids.tolist() == [[0, 1, 2, 3, 4, 3, 4, 5], [0, 1, 2, 0, 0, 0, 0, 0]]
    # predicting, in the rollout's order: row 0 by 2 (the prompt's last), 3; row 1 by 8 + 1; row 2 by 2, 5, 6
    assert layout.predicting.tolist() == [2, 3, 9, 2, 5, 6]
    visible = layout.attention_mask[0, 0]
    assert visible[5].tolist() == [True, True, True, False, False, True, False, False]  # 50: the prompt and itself
    assert visible[4].tolist() == [True, True, True, True, True, False, False, False]  # 31: the prompt, 30, itself
    assert visible[2].tolist() == [True, True, True, False, False, False, False, False]  # the prompt is causal
    padding = layout.attention_mask[1, 0]
    assert padding[2].tolist() == [True, True, True, False, False, False, False, False]
    assert padding[5].tolist() == [False] * 5 + [True, False, False]  # padding sees itself only
    assert layout.tokens == 16  # against 3 x (3 + 3) = 18 rows x columns for the plain pass


@pytest.mark.parametrize("chunk_size", [None, 4])
def test_shared_prompt_passes_give_the_plain_paths_values_and_gradients(policy, grouped_rollout, chunk_size):
    assert_same_values_and_gradients(
        policy,
        grouped_rollout,
        loss_and_gradients(policy, grouped_rollout, None),
        loss_and_gradients(policy, grouped_rollout, chunk_size, shared_prompts=True),
    )


def test_each_row_keeps_its_own_values_when_prompts_differ(policy, tiny_model_cfg):
    """No two rows share a prompt: one packed row each, the plain path's values."""
    generator = torch.Generator().manual_seed(1)
    vocab = load_tokenizer(tiny_model_cfg).vocab_size
    prompts = [torch.randint(5, vocab, (n,), generator=generator).tolist() for n in (3, 8, 5)]
    responses = [torch.randint(5, vocab, (n,), generator=generator).tolist() for n in (4, 2, 7)]
    rollout = pack_rollout(prompts, responses, pad_id=3)
    with torch.no_grad():
        plain, _ = response_log_probs(policy, rollout, TEMPERATURE)
        shared, _ = response_log_probs(policy, rollout, TEMPERATURE, shared_prompts=True)
    torch.testing.assert_close(masked(shared, rollout), masked(plain, rollout), atol=ATOL, rtol=0)


def test_grpo_steps_with_shared_prompt_passes_train_the_same(tiny_model_cfg, data_cfg, tmp_path):
    """Two turns a step, four samples each, micro-batches of 3 rows (a group split across passes): the LoRA weights
    and loss after two steps match the plain passes'."""
    tokenizer = load_tokenizer(tiny_model_cfg)
    trained = {}
    for shared in (False, True):
        policy = policy_with_random_lora_b(float32_cfg(tiny_model_cfg), seed=1)
        module = scripted_module(
            policy, tokenizer, [GOOD, BAD, GOOD, BAD], kl_beta=0.01, entropy_coef=0.01, micro_batch_size=3,
            temperature=TEMPERATURE, shared_prompt_passes=shared,
        )  # fmt: skip
        trainer = fit(module, data_cfg, [ScriptedScorer({GOOD: 2.0, BAD: 0.0})], 2, tmp_path, batch_size=2)
        trained[shared] = (lora_state(policy), float(trainer.callback_metrics["train/loss"]))
    (plain_weights, plain_loss), (shared_weights, shared_loss) = trained[False], trained[True]
    for name, weight in plain_weights.items():
        torch.testing.assert_close(shared_weights[name], weight, atol=ATOL, rtol=0, msg=name)
    assert abs(shared_loss - plain_loss) < ATOL


def test_attention_that_ignores_a_custom_mask_is_refused(policy, grouped_rollout):
    config = policy.get_base_model().config
    before = config._attn_implementation
    config._attn_implementation = "flash_attention_2"
    try:
        with pytest.raises(ValueError, match="rl.shared_prompt_passes=false"):
            response_log_probs(policy, grouped_rollout, shared_prompts=True)
    finally:
        config._attn_implementation = before
