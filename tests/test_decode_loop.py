"""Our decoding loop (cqr_lightning/models/decode_loop.py) against transformers' `generate`, on the tiny 4-bit model on
CPU (uncompiled, and once compiled by torch.compile's inductor on the CPU: the GPU adds CUDA graphs to the same step),
and the sampling filters against transformers' own logits warpers."""

from __future__ import annotations

import pytest
import torch
from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from cqr_lightning.models.decode_loop import decode, static_cache_for
from cqr_lightning.models.generation import generate
from cqr_lightning.models.loading import load_policy, load_tokenizer
from cqr_lightning.models.sampling import filtered_logits, next_tokens


@pytest.fixture(scope="module")
def tokenizer(tiny_model_cfg):
    return load_tokenizer(tiny_model_cfg)


@pytest.fixture(scope="module")
def policy(tiny_model_cfg):
    torch.manual_seed(0)
    return load_policy(tiny_model_cfg)


@pytest.fixture(scope="module")
def prompts(tokenizer) -> list[str]:
    texts = [
        "Query: when did she die?\nRewrite:",
        "Q1: Who wrote Pride and Prejudice?\nA1: Jane Austen.\n\nQuery: when did she die?\nRewrite:",
        "Tell me more about the history of the city.",
    ]
    return [
        tokenizer.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True, tokenize=False)
        for t in texts
    ]


def test_greedy_loop_writes_generates_tokens_for_left_padded_prompts_of_different_lengths(policy, tokenizer, prompts):
    options = {"max_new_tokens": 12, "stop_strings": (), "static_cache_width": 80}
    reference = generate(policy, tokenizer, prompts, **options)
    ours = generate(policy, tokenizer, prompts, decode_loop=True, **options)
    assert [s.response_ids for s in ours] == [s.response_ids for s in reference]
    assert all(len(s.response_ids) == 12 for s in ours)  # random weights: no row ends early


def test_sampled_groups_come_prompt_major_reproducibly_and_near_zero_temperature_is_greedy(policy, tokenizer, prompts):
    options = {"max_new_tokens": 8, "stop_strings": (), "static_cache_width": 80, "decode_loop": True}
    greedy = generate(policy, tokenizer, prompts, **options)
    sampling = {"do_sample": True, "num_return_sequences": 3, "seed": 4}
    first = generate(policy, tokenizer, prompts, temperature=1.5, **sampling, **options)
    again = generate(policy, tokenizer, prompts, temperature=1.5, **sampling, **options)
    assert [s.prompt_index for s in first] == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert [s.response_ids for s in first] == [s.response_ids for s in again]
    assert len({s.response_ids for s in first}) > 3  # samples differ within groups
    cold = generate(policy, tokenizer, prompts, temperature=1e-4, **sampling, **options)
    assert [s.response_ids for s in cold] == [s.response_ids for s in greedy for _ in range(3)]


def test_the_samples_of_a_prompt_share_one_prefill_and_write_what_separate_prefills_write(policy, tokenizer, prompts):
    encoded = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    width = max(map(len, encoded))
    ids = torch.tensor([[0] * (width - len(row)) + row for row in encoded])  # left-padded [3, W]
    mask = torch.tensor([[0] * (width - len(row)) + [1] * len(row) for row in encoded])
    options = {"max_new_tokens": 10, "eos_ids": [tokenizer.eos_token_id], "pad_id": 0, "compile_step": False}
    calls = []
    hook = policy.register_forward_pre_hook(
        lambda _, args, kwargs: calls.append(kwargs["input_ids"].shape), with_kwargs=True
    )
    try:
        shared = decode(policy, ids, mask, copies=4, **options)
    finally:
        hook.remove()
    assert calls[0] == (3, width), "one prefill of the three prompts, not of their twelve samples"
    assert set(calls[1:]) == {(12, 1)}, "then one token for each of the twelve rows"
    separate = decode(policy, ids.repeat_interleave(4, 0), mask.repeat_interleave(4, 0), **options)
    assert shared.shape == (12, 10) and torch.equal(shared, separate)


def test_a_second_call_reuses_the_cache_and_a_narrower_batch_gives_the_same_tokens(policy, tokenizer, prompts):
    wide = generate(
        policy, tokenizer, prompts, max_new_tokens=6, stop_strings=(), static_cache_width=90, decode_loop=True
    )
    built, length = static_cache_for(policy, len(prompts), 1)  # the cache the call built (any shorter need reuses it)
    # same batch size, prompts padded less: the cache built for the first call (longer) is emptied and reused
    narrow = generate(
        policy, tokenizer, prompts, max_new_tokens=6, stop_strings=(), static_cache_width=40, decode_loop=True
    )
    assert [s.response_ids for s in narrow] == [s.response_ids for s in wide]
    assert length >= 90 + 6
    assert static_cache_for(policy, len(prompts), 1) == (built, length)


def test_a_stop_string_ends_the_row_as_generate_does(policy, tokenizer, prompts):
    free = generate(policy, tokenizer, prompts[:1], max_new_tokens=20, stop_strings=(), static_cache_width=64)[0]
    stop = free.text[6:9]  # a piece of what the model writes anyway, so it stops there
    assert stop.strip()
    reference = generate(policy, tokenizer, prompts[:1], max_new_tokens=20, stop_strings=(stop,), static_cache_width=64)
    ours = generate(
        policy, tokenizer, prompts[:1], max_new_tokens=20, stop_strings=(stop,), static_cache_width=64, decode_loop=True
    )
    assert reference[0].finish_reason == ours[0].finish_reason == "stop"
    assert ours[0].text == reference[0].text and ours[0].text.endswith(stop)
    assert ours[0].response_ids == reference[0].response_ids


def test_rows_end_at_end_of_sequence_and_the_loop_stops_when_all_have(policy, tokenizer, prompts):
    encoded = tokenizer(prompts[:2], add_special_tokens=False)["input_ids"]
    width = max(map(len, encoded))
    ids = torch.tensor([[0] * (width - len(r)) + r for r in encoded])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in encoded])
    first = decode(policy, ids, mask, max_new_tokens=8, eos_ids=[999_999], pad_id=0)
    # make each row's second token its end of sequence: row ends there, later tokens are the pad id
    ends = [int(first[0, 1]), int(first[1, 1])]
    out = decode(policy, ids, mask, max_new_tokens=8, eos_ids=ends, pad_id=0, check_every=3)
    assert out.shape[1] < 8  # stopped early, at a check after every row ended
    for row in range(2):
        end = next(i for i, t in enumerate(out[row].tolist()) if t in ends)
        assert end <= 1
        assert out[row, end + 1 :].tolist() == [0] * (out.shape[1] - end - 1)
    # with min_new_tokens the end ids cannot be drawn early
    held = decode(policy, ids, mask, max_new_tokens=8, eos_ids=ends, pad_id=0, min_new_tokens=8)
    assert held.shape[1] == 8 and not torch.isin(held, torch.tensor(ends)).any()


@pytest.mark.slow
def test_the_compiled_step_writes_generates_tokens_and_a_second_call_compiles_nothing_new(
    tiny_model_cfg, tokenizer, prompts
):
    cfg = tiny_model_cfg.copy()
    cfg.load_in_4bit, cfg.compute_dtype = False, "float32"  # a plain model, as the merged sampling copy is
    model = load_policy(cfg).merge_and_unload()
    options = {"max_new_tokens": 8, "stop_strings": (), "static_cache_width": 48}
    reference = [s.response_ids for s in generate(model, tokenizer, prompts, **options)]
    encoded = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([[0] * (48 - len(r)) + r for r in encoded])
    mask = torch.tensor([[0] * (48 - len(r)) + [1] * len(r) for r in encoded])
    graphs = torch._dynamo.utils.counters["stats"]
    frames = [graphs["unique_graphs"]]
    for _ in range(2):
        out = decode(model, ids, mask, max_new_tokens=8, eos_ids=[10**6], pad_id=0, compile_step=True)  # inductor
        assert [tuple(row) for row in out.tolist()] == reference
        frames.append(graphs["unique_graphs"])
    assert frames[1] > frames[0], "the first call compiled the step"
    assert frames[2] == frames[1], "the second call reused the compiled step"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_the_compiled_loop_on_a_gpu_writes_generates_greedy_tokens(tiny_model_cfg, tokenizer, prompts):
    cfg = tiny_model_cfg.copy()
    cfg.device = "cuda"
    policy = load_policy(cfg)
    options = {"max_new_tokens": 12, "stop_strings": (), "static_cache_width": 80}
    reference = generate(policy, tokenizer, prompts, **options)
    for _ in range(2):  # the second call replays the graphs the first one recorded
        ours = generate(policy, tokenizer, prompts, decode_loop=True, **options)
        assert [s.response_ids for s in ours] == [s.response_ids for s in reference]


@pytest.mark.parametrize(
    ("temperature", "top_k", "top_p"), [(0.7, 0, 1.0), (1.0, 5, 1.0), (0.7, 0, 0.8), (1.3, 7, 0.6)]
)
def test_filters_keep_the_tokens_transformers_warpers_keep(temperature, top_k, top_p):
    torch.manual_seed(1)
    logits = torch.randn(4, 50) * 3
    expected = TemperatureLogitsWarper(temperature)(None, logits.clone())
    if top_k:
        expected = TopKLogitsWarper(top_k)(None, expected)
    if top_p < 1.0:
        expected = TopPLogitsWarper(top_p)(None, expected)
    ours = filtered_logits(logits, temperature, top_k, top_p)
    assert torch.equal(torch.isinf(ours), torch.isinf(expected))
    assert torch.allclose(ours[~torch.isinf(ours)], expected[~torch.isinf(expected)])


def test_the_exponential_race_draws_tokens_with_the_softmax_probabilities():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    generator = torch.Generator().manual_seed(0)
    draws = torch.cat([next_tokens(logits.expand(1000, 4), do_sample=True, generator=generator) for _ in range(20)])
    frequencies = torch.bincount(draws, minlength=4).float() / len(draws)  # 20,000 draws
    assert torch.allclose(frequencies, torch.tensor([0.5, 0.3, 0.15, 0.05]), atol=0.015)
    # top-k 2 leaves only the two most likely tokens, renormalized
    kept = torch.cat(
        [next_tokens(logits.expand(1000, 4), do_sample=True, top_k=2, generator=generator) for _ in range(5)]
    )
    assert set(kept.tolist()) == {0, 1}
    assert abs((kept == 0).float().mean().item() - 0.625) < 0.03
    assert next_tokens(logits, do_sample=False).tolist() == [0]
