"""The loss passes' micro-batches: rows ordered by prompt length, each micro-batch cut to its own longest prompt and
response (`RLModule.micro_batches`, `Rollout.select`), on the tiny model in float32 (values within 1e-5)."""

from __future__ import annotations

import torch
from test_chunked_logprobs import ATOL, float32_cfg, masked
from test_rl import BAD, GOOD, ScriptedScorer, fit, lora_state, policy_with_random_lora_b, scripted_module

from cqr_lightning.grpo.rollout import pack_rollout, response_log_probs
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
