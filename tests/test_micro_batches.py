"""The loss passes' micro-batches: rows ordered by prompt length, each micro-batch cut to its own longest prompt and
response (`RLModule.micro_batches`, `Rollout.select`), on the tiny model in float32 (values within 1e-5)."""

from __future__ import annotations

import pytest
import torch
from test_chunked_logprobs import ATOL, float32_cfg, masked
from test_rl import BAD, GOOD, ScriptedScorer, fit, lora_state, policy_with_random_lora_b, scripted_module

from cqr_lightning.grpo.rollout import micro_batch_layout, pack_rollout, response_log_probs
from cqr_lightning.models.loading import load_tokenizer
from cqr_lightning.modules.rl import RLModule

PROMPT_LENGTHS, RESPONSE_LENGTHS = (7, 12, 9, 12, 3, 10), (5, 11, 1, 8, 11, 6)


def six_rows(vocab: int):
    generator = torch.Generator().manual_seed(0)
    prompts = [torch.randint(5, vocab, (n,), generator=generator).tolist() for n in PROMPT_LENGTHS]
    responses = [torch.randint(5, vocab, (n,), generator=generator).tolist() for n in RESPONSE_LENGTHS]
    return pack_rollout(prompts, responses, pad_id=3)


def test_a_micro_batch_drops_the_columns_padded_in_all_its_rows_and_keeps_its_log_probs(tiny_model_cfg):
    policy = policy_with_random_lora_b(float32_cfg(tiny_model_cfg), seed=3)
    rollout = six_rows(load_tokenizer(tiny_model_cfg).vocab_size)
    rows = torch.tensor([0, 4])  # prompts of 7 and 3 tokens, responses of 5 and 11, in a batch padded to 12 + 11
    part = rollout.select(rows)
    assert part.input_ids.shape == (2, 7 + 11) and part.prompt_width == 7
    assert part.attention_mask.sum(dim=1).tolist() == [7 + 5, 3 + 11]
    with torch.no_grad():
        whole, _ = response_log_probs(policy, rollout)
        cut, _ = response_log_probs(policy, part)
    torch.testing.assert_close(masked(cut, part), masked(whole[rows], rollout.select(rows)), atol=ATOL, rtol=0)


def test_micro_batches_take_rows_by_prompt_length_each_once(tiny_model_cfg):
    tokenizer = load_tokenizer(tiny_model_cfg)
    module = RLModule(policy_with_random_lora_b(float32_cfg(tiny_model_cfg)), tokenizer, micro_batch_size=2)
    rollout = six_rows(tokenizer.vocab_size)
    batches = [index.tolist() for index in module.micro_batches(rollout)]
    assert batches == [[1, 3], [5, 2], [0, 4]]  # prompts 12, 12 | 10, 9 | 7, 3
    padded = sum(rollout.select(torch.tensor(b)).input_ids.numel() for b in batches)
    in_order = sum(rollout.select(slice(i, i + 2)).input_ids.numel() for i in range(0, 6, 2))
    assert padded < in_order


def test_micro_batches_of_different_prompts_train_as_one_batch(tiny_model_cfg, data_cfg, tmp_path):
    """Two turns a step (prompts of different lengths), four samples each: three micro-batches of 3, 3 and 2 rows
    cut to their own widths give the LoRA weights that one micro-batch of all 8 gives."""
    tokenizer = load_tokenizer(tiny_model_cfg)
    trained = {}
    for micro_batch_size in (8, 3):
        policy = policy_with_random_lora_b(float32_cfg(tiny_model_cfg), seed=1)
        module = scripted_module(
            policy, tokenizer, [GOOD, BAD, BAD, GOOD], kl_beta=0.01, micro_batch_size=micro_batch_size
        )
        trainer = fit(module, data_cfg, [ScriptedScorer({GOOD: 2.0, BAD: 0.0})], 2, tmp_path, batch_size=2)
        trained[micro_batch_size] = (lora_state(policy), float(trainer.callback_metrics["train/loss"]))
    (one_weights, one_loss), (split_weights, split_loss) = trained[8], trained[3]
    for name, weight in one_weights.items():
        torch.testing.assert_close(split_weights[name], weight, atol=ATOL, rtol=0, msg=name)
    assert abs(split_loss - one_loss) < ATOL


def test_a_token_budget_closes_a_micro_batch_before_its_padded_tokens_pass_the_budget(tiny_model_cfg):
    rollout = six_rows(load_tokenizer(tiny_model_cfg).vocab_size)
    batches = [index.tolist() for index in rollout.micro_batches(6, max_tokens=50)]
    # by prompt: rows 1 (12 + 11), 3 (12 + 8) | 5 (10 + 6), 2 (9 + 1), 0 (7 + 5) | 4 (3 + 11): 46, 48 and 14 tokens
    assert batches == [[1, 3], [5, 2, 0], [4]]
    assert [rollout.select(torch.tensor(b)).input_ids.numel() for b in batches] == [2 * 23, 3 * 16, 14]
    assert [index.tolist() for index in rollout.micro_batches(2, max_tokens=50)] == [[1, 3], [5, 2], [0, 4]]


def test_a_row_longer_than_the_budget_is_a_micro_batch_of_its_own():
    assert micro_batch_layout([30, 5, 4], [10, 2, 2], max_rows=8, max_tokens=20) == [[0], [1, 2]]
    with pytest.raises(ValueError, match="at least one row and one token"):
        micro_batch_layout([3], [1], max_rows=8, max_tokens=0)


def test_at_least_halves_the_micro_batch_with_most_rows_until_there_are_that_many():
    prompts, responses = [12, 12, 10, 9, 7, 3], [1] * 6
    assert micro_batch_layout(prompts, responses, max_rows=6) == [[0, 1, 2, 3, 4, 5]]
    assert micro_batch_layout(prompts, responses, max_rows=6, at_least=3) == [[0], [1, 2], [3, 4, 5]]
    assert micro_batch_layout(prompts[:2], responses[:2], max_rows=6, at_least=5) == [[0], [1]]  # one row each


def recorded_layouts(module) -> list:
    """The micro-batches `module` takes, one list per pass, as it takes them."""
    layouts, split = [], module.micro_batches

    def recording(rollout):
        layouts.append(split(rollout))
        return layouts[-1]

    module.micro_batches = recording
    return layouts


def test_micro_batches_under_a_token_budget_train_as_one_batch(tiny_model_cfg, data_cfg, tmp_path):
    """A budget of one token makes every sequence its own micro-batch: the LoRA weights and loss of one batch."""
    tokenizer = load_tokenizer(tiny_model_cfg)
    trained = []
    for tokens in (None, 1):
        policy = policy_with_random_lora_b(float32_cfg(tiny_model_cfg), seed=1)
        module = scripted_module(
            policy, tokenizer, [GOOD, BAD, BAD, GOOD], kl_beta=0.01, micro_batch_size=8, micro_batch_tokens=tokens
        )
        layouts = recorded_layouts(module)
        trainer = fit(module, data_cfg, [ScriptedScorer({GOOD: 2.0, BAD: 0.0})], 2, tmp_path, batch_size=2)
        trained.append((lora_state(policy), float(trainer.callback_metrics["train/loss"]), layouts))
    (one_weights, one_loss, one_layouts), (split_weights, split_loss, split_layouts) = trained
    assert {len(layout) for layout in one_layouts} == {1} and {len(layout) for layout in split_layouts} == {8}
    for name, weight in one_weights.items():
        torch.testing.assert_close(split_weights[name], weight, atol=ATOL, rtol=0, msg=name)
    assert abs(split_loss - one_loss) < ATOL


def test_a_budget_that_is_not_a_positive_integer_names_the_setting(tiny_model_cfg):
    tokenizer = load_tokenizer(tiny_model_cfg)
    with pytest.raises(ValueError, match=r"rl.micro_batch_tokens=0 must be a positive integer or null"):
        RLModule(policy_with_random_lora_b(float32_cfg(tiny_model_cfg)), tokenizer, micro_batch_tokens=0)
