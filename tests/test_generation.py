"""Generation on CPU with the tiny 4-bit model; scripted outputs check stopping, truncation and reading rewrites."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from transformers import LogitsProcessor, LogitsProcessorList

from cqr_lightning.errors import ConfigError
from cqr_lightning.models.generation import GeneratedSample, generate, static_prompt_width, truncate_at_stop
from cqr_lightning.models.loading import ModelConfig, load_policy, load_tokenizer
from cqr_lightning.prompts import REWRITE_ONLY, THINK_REWRITE
from cqr_lightning.records import Turn, Utterance
from cqr_lightning.rewriters import ModelRewriter

CONF_DIR = Path(__file__).resolve().parents[1] / "conf" / "model"
RESPONSE = "<think> she is Jane Austen </think>\n<rewrite> When did Jane Austen die? </rewrite>"


@pytest.fixture(scope="module")
def tiny_cfg(tmp_path_factory):
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CQR_CACHE_DIR", str(tmp_path_factory.mktemp("cqr_cache")))
        yield ModelConfig.from_cfg(OmegaConf.load(CONF_DIR / "tiny.yaml"))


@pytest.fixture(scope="module")
def tokenizer(tiny_cfg):
    return load_tokenizer(tiny_cfg)


@pytest.fixture(scope="module")
def policy(tiny_cfg):
    torch.manual_seed(0)
    return load_policy(tiny_cfg)


def chat(tokenizer, text: str) -> str:
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False
    )


@pytest.fixture(scope="module")
def prompts(tokenizer) -> list[str]:
    return [
        chat(tokenizer, "Query: when did she die?\nRewrite:"),
        chat(
            tokenizer,
            "### Context Begin ###\nQ1: Who wrote Pride and Prejudice?\nA1: Jane Austen.\n"
            "### Context End ###\n\nQuery: when did she die?\nRewrite:",
        ),
    ]


class Script(LogitsProcessor):
    """Forces row i of the batch to emit `rows[i]` token by token (the last token repeats)."""

    def __init__(self, rows: list[list[int]], prompt_width: int):
        self.rows = rows
        self.prompt_width = prompt_width

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        step = input_ids.shape[1] - self.prompt_width
        forced = torch.full_like(scores, float("-inf"))
        for row, tokens in enumerate(self.rows):
            forced[row, tokens[min(step, len(tokens) - 1)]] = 0.0
        return forced


def scripted(model, monkeypatch, rows: list[list[int]], prompt_width: int):
    monkeypatch.setattr(
        model, "generate", partial(model.generate, logits_processor=LogitsProcessorList([Script(rows, prompt_width)]))
    )


def ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_truncate_at_stop_cuts_after_the_closing_tag(tokenizer):
    tokens = ids(tokenizer, RESPONSE + " and then more words")
    kept, stopped = truncate_at_stop(tokens, tokenizer, ["</rewrite>"])
    assert stopped
    assert tokenizer.decode(kept) == RESPONSE
    assert kept == tokens[: len(kept)]


def test_truncate_at_stop_keeps_the_token_that_completes_the_stop_string(tokenizer):
    tokens = ids(tokenizer, "the rewrite is done")
    kept, stopped = truncate_at_stop(tokens, tokenizer, ["rew"])
    assert stopped
    text = tokenizer.decode(kept)
    assert "rew" in text and "rew" not in tokenizer.decode(kept[:-1])


def test_truncate_at_stop_picks_the_earliest_stop_string(tokenizer):
    tokens = ids(tokenizer, RESPONSE)
    kept, stopped = truncate_at_stop(tokens, tokenizer, ["</rewrite>", "</think>"])
    assert stopped and tokenizer.decode(kept) == "<think> she is Jane Austen </think>"


def test_truncate_at_stop_without_a_stop_string(tokenizer):
    tokens = ids(tokenizer, "<think> no tag closes here")
    assert truncate_at_stop(tokens, tokenizer, ["</rewrite>"]) == (tokens, False)
    assert truncate_at_stop(tokens, tokenizer, []) == (tokens, False)
    assert truncate_at_stop([], tokenizer, ["</rewrite>"]) == ([], False)


def test_scripted_generation_stops_at_rewrite_eos_or_length(policy, tokenizer, prompts, monkeypatch):
    batch = [prompts[0], prompts[1], prompts[0]]
    width = max(len(ids(tokenizer, p)) for p in batch)
    stop_row = ids(tokenizer, RESPONSE + " extra words after the tag")
    eos_row = ids(tokenizer, "<think> cut short") + [tokenizer.eos_token_id, 5, 6]
    long_row = ids(tokenizer, "the river flows through the valley before it reaches the sea")
    scripted(policy, monkeypatch, [stop_row, eos_row, long_row], width)

    samples = generate(policy, tokenizer, batch, max_new_tokens=8 + len(stop_row))
    assert [s.finish_reason for s in samples] == ["stop", "eos", "length"]
    assert samples[0].text == RESPONSE
    assert list(samples[0].response_ids) == ids(tokenizer, RESPONSE)
    assert samples[1].text == "<think> cut short"
    assert tokenizer.eos_token_id not in samples[1].response_ids
    assert tokenizer.pad_token_id not in samples[1].response_ids
    assert len(samples[2].response_ids) == 8 + len(stop_row)
    for sample, prompt in zip(samples, batch, strict=True):
        assert list(sample.prompt_ids) == ids(tokenizer, prompt)


def test_generate_stops_the_batch_once_every_row_hit_the_tag(policy, tokenizer, prompts, monkeypatch):
    width = max(len(ids(tokenizer, p)) for p in prompts)
    row = ids(tokenizer, RESPONSE + " never reached")
    scripted(policy, monkeypatch, [row, row], width)
    calls = []
    inner = policy.generate
    monkeypatch.setattr(policy, "generate", lambda **kw: calls.append(out := inner(**kw)) or out)
    samples = generate(policy, tokenizer, prompts, max_new_tokens=100)
    assert [s.finish_reason for s in samples] == ["stop", "stop"]
    assert calls[0].shape[1] == width + len(ids(tokenizer, RESPONSE))


def test_num_return_sequences_per_prompt_in_order(policy, tokenizer, prompts):
    samples = generate(
        policy, tokenizer, prompts, max_new_tokens=5, do_sample=True, temperature=1.0, num_return_sequences=3, seed=0
    )
    assert [s.prompt_index for s in samples] == [0, 0, 0, 1, 1, 1]
    assert all(isinstance(s, GeneratedSample) and 0 < len(s.response_ids) <= 5 for s in samples)
    assert len({s.response_ids for s in samples}) > 1


def test_sampling_is_reproducible_with_a_seed(policy, tokenizer, prompts):
    options = {"max_new_tokens": 8, "do_sample": True, "temperature": 1.0, "top_p": 0.95, "num_return_sequences": 2}
    state = torch.get_rng_state()
    first = generate(policy, tokenizer, prompts, seed=7, **options)
    assert torch.equal(torch.get_rng_state(), state)  # the global stream is left alone
    assert generate(policy, tokenizer, prompts, seed=7, **options) == first
    assert generate(policy, tokenizer, prompts, seed=8, **options) != first

    torch.manual_seed(11)
    global_seeded = generate(policy, tokenizer, prompts, **options)
    torch.manual_seed(11)
    assert generate(policy, tokenizer, prompts, **options) == global_seeded


def test_left_padding_does_not_change_greedy_output(policy, tokenizer, prompts):
    short, long = prompts
    assert len(ids(tokenizer, long)) > len(ids(tokenizer, short)) + 10
    alone = generate(policy, tokenizer, [short], max_new_tokens=12, stop_strings=())
    batched = generate(policy, tokenizer, [long, short], max_new_tokens=12, stop_strings=())
    one_by_one = generate(policy, tokenizer, [long, short], max_new_tokens=12, stop_strings=(), batch_size=1)
    assert len(alone[0].response_ids) == 12
    assert batched[1].response_ids == alone[0].response_ids
    assert batched[1].prompt_ids == alone[0].prompt_ids
    assert [s.response_ids for s in one_by_one] == [s.response_ids for s in batched]
    assert [s.prompt_index for s in one_by_one] == [0, 1]


def test_generate_restores_the_training_mode(policy, tokenizer, prompts):
    policy.train()
    generate(policy, tokenizer, prompts[:1], max_new_tokens=2)
    assert policy.training
    policy.eval()
    generate(policy, tokenizer, prompts[:1], max_new_tokens=2)
    assert not policy.training
    policy.train()


def test_generate_restores_the_mode_after_an_error(policy, tokenizer, prompts, monkeypatch):
    def fail(**kwargs):
        raise RuntimeError("out of memory")

    policy.train()
    monkeypatch.setattr(policy, "generate", fail)
    with pytest.raises(RuntimeError):
        generate(policy, tokenizer, prompts, max_new_tokens=2)
    assert policy.training


def test_no_prompts_and_empty_prompts(policy, tokenizer):
    assert generate(policy, tokenizer, [], max_new_tokens=2) == []
    with pytest.raises(ValueError, match="no tokens"):
        generate(policy, tokenizer, ["hello", ""], max_new_tokens=2)


def _turn(question: str) -> Turn:
    history = (Utterance("user", "Who wrote Pride and Prejudice?"), Utterance("assistant", "Jane Austen."))
    return Turn(id="t1", history=history, question=question, positives=("p1",))


def test_model_rewriter_prefills_the_tag_and_reads_a_broken_rewrite_leniently(policy, tokenizer, monkeypatch):
    rewriter = ModelRewriter(
        policy, tokenizer, max_new_tokens=12, response_format=REWRITE_ONLY, prefill=True, lenient=True
    )
    turns = [_turn("when did she die?"), _turn("where was she born?")]
    prompts = rewriter.prompts(turns)
    assert all(p.endswith("<rewrite>") for p in prompts)
    width = max(len(ids(tokenizer, p)) for p in prompts)
    broken = ids(tokenizer, " When did Jane Austen die?\nextra") + [tokenizer.eos_token_id]
    empty = ids(tokenizer, "</rewrite>")
    scripted(policy, monkeypatch, [broken, empty], width)

    rewrites = rewriter(turns)
    assert rewrites[0].response.startswith("<rewrite> When did Jane Austen die?")
    assert rewrites[0].query == "When did Jane Austen die?" and rewrites[0].format_ok is False
    assert rewrites[1].query == "where was she born?"  # nothing readable: the question is the query
    strict = ModelRewriter(policy, tokenizer, max_new_tokens=12, response_format=REWRITE_ONLY, prefill=True)
    scripted(policy, monkeypatch, [broken], len(ids(tokenizer, prompts[0])))
    assert strict(turns[:1])[0].query == "when did she die?"


def test_lenient_reading_needs_the_rewrite_only_format(policy, tokenizer):
    with pytest.raises(ConfigError, match="rewrite_only"):
        ModelRewriter(policy, tokenizer, response_format=THINK_REWRITE, lenient=True)


def test_static_cache_with_padded_prompts_writes_the_same_greedy_text(policy, tokenizer, prompts):
    dynamic = generate(policy, tokenizer, prompts, max_new_tokens=10, stop_strings=())
    width = max(len(ids(tokenizer, p)) for p in prompts) + 7  # wider than any prompt: extra left padding
    static = generate(policy, tokenizer, prompts, max_new_tokens=10, stop_strings=(), static_cache_width=width)
    assert [s.response_ids for s in static] == [s.response_ids for s in dynamic]
    assert [list(s.prompt_ids) for s in static] == [ids(tokenizer, p) for p in prompts]
    # transformers (pinned) records the static cache it built: prompt width plus the response budget
    assert policy.base_model.model._previous_max_cache_length >= width + 9


def test_static_cache_samples_the_same_groups_with_the_same_seed(policy, tokenizer, prompts):
    options = {"max_new_tokens": 10, "do_sample": True, "temperature": 0.7, "num_return_sequences": 3, "seed": 5}
    dynamic = generate(policy, tokenizer, prompts, stop_strings=(), **options)
    static = generate(policy, tokenizer, prompts, stop_strings=(), static_cache_width=64, **options)
    assert [s.prompt_index for s in static] == [0, 0, 0, 1, 1, 1]
    assert [s.response_ids for s in static] == [s.response_ids for s in dynamic]


def test_static_prompt_width_rounds_the_longest_prompt_up_to_a_bucket_within_the_cap():
    assert static_prompt_width(175, 1536) == 1536  # no bucket: every call padded to the cap
    assert static_prompt_width(175, 1536, bucket=256) == 256
    assert static_prompt_width(256, 1536, bucket=256) == 256  # on the grid already: no slack added
    assert static_prompt_width(257, 1536, bucket=256) == 512
    assert static_prompt_width(1500, 1536, bucket=256) == 1536  # the cap, not the next multiple (1,792)
    assert static_prompt_width(1600, 1536, bucket=256) == 1600  # a prompt over the cap is never cut
    assert static_prompt_width(1600, 1536) == 1600
    assert {static_prompt_width(n, 1536, bucket=256) for n in range(1, 1537)} == {256, 512, 768, 1024, 1280, 1536}
    with pytest.raises(ValueError, match="bucket"):
        static_prompt_width(10, 100, bucket=0)


def test_static_cache_with_a_bucket_pads_less_and_writes_the_same_greedy_text(policy, tokenizer, prompts, monkeypatch):
    # transformers keeps the largest static cache a model has built; start from none, as a fresh run does
    monkeypatch.delattr(policy.base_model.model, "_previous_max_cache_length", raising=False)
    dynamic = generate(policy, tokenizer, prompts, max_new_tokens=10, stop_strings=())
    longest = max(len(ids(tokenizer, p)) for p in prompts)
    bucketed = generate(
        policy, tokenizer, prompts, max_new_tokens=10, stop_strings=(), static_cache_width=longest + 200,
        static_cache_bucket=8,
    )  # fmt: skip
    assert [s.response_ids for s in bucketed] == [s.response_ids for s in dynamic]
    # the static cache covers the prompts rounded up to 8 tokens plus the response budget, not the 200-token cap
    expected = -(-longest // 8) * 8 + 10
    assert expected - 1 <= policy.base_model.model._previous_max_cache_length <= expected
