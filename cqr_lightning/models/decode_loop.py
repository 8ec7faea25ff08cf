"""Our own decoding loop over a static KV cache: one compiled forward per token, sampling and end checks on the GPU.

transformers' `generate` with a static cache compiles the model's decoding step, but around it every token still
runs its logits processors and stopping criteria from Python and reads a flag back from the GPU to decide whether
to go on. On a GPU that host work and that synchronization leave the device idle for part of every token
(bench/RESULTS.md, "Where a step's time goes"). Here a token is: one replay of the compiled forward (CUDA graphs
under `torch.compile(mode="reduce-overhead")`), a few sampling kernels (`sampling.next_tokens`), and a finished-row
update on the device. The host looks at the tokens only every `check_every` tokens, to end early when every row is
finished (end-of-sequence or a stop string). A model with grouped-query attention attends from its cache as stored,
without a copy of each key/value head per query head (`packed_gqa`). Several samples of one prompt (`copies`, GRPO's
G) share its prefill: the prompt runs through the model once and its keys and values are copied into each sample's
rows of the cache.

The outputs follow `generate`'s conventions, so `generation.generate` reads them the same way: one row per prompt
and return sequence (prompt-major), the tokens after a row's end-of-sequence set to the pad id, and as many columns
as the longest row needed (at most `max_new_tokens`). Greedy decoding gives `generate`'s tokens (tests); sampling
draws from the same filtered distribution with other random numbers.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence

import torch
from transformers import StaticCache

from cqr_lightning.grpo.rollout import position_ids
from cqr_lightning.models.packed_gqa import packed_gqa
from cqr_lightning.models.sampling import next_tokens

_caches: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> (batch, length, StaticCache)
_compiled: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> compiled forward


def static_cache_for(model, batch: int, length: int) -> tuple[StaticCache, int]:
    """The model's static cache, emptied, and its length: reused when it has `batch` rows and at least `length`
    positions, otherwise a new one of exactly that size. As in `generate`, a cache never shrinks, so a compiled step
    keeps its shapes."""
    held = _caches.get(model)
    if held is not None and held[0] == batch and held[1] >= length:
        held[2].reset()
        return held[2], held[1]
    cache = StaticCache(config=model.config, max_cache_len=length)
    _caches[model] = (batch, length, cache)
    return cache, length


def compiled_forward(model, compile_step: bool) -> Callable:
    """The model's forward, compiled once per model for decoding (static shapes, CUDA graphs) when `compile_step`."""
    if not compile_step:
        return model
    step = _compiled.get(model)
    if step is None:
        step = torch.compile(model, mode="reduce-overhead", dynamic=False)
        _compiled[model] = step
    return step


def _rows_with_stop(tokens: torch.Tensor, tokenizer, stop_strings: Sequence[str], rows: Sequence[int]) -> list[int]:
    """Those of `rows` whose decoded tokens so far contain a stop string."""
    ids = tokens[list(rows)].tolist()
    texts = tokenizer.batch_decode(ids, skip_special_tokens=True)
    return [row for row, text in zip(rows, texts, strict=True) if any(stop in text for stop in stop_strings)]


def decode(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    max_new_tokens: int,
    eos_ids: Sequence[int],
    pad_id: int,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    min_new_tokens: int = 0,
    stop_strings: Sequence[str] = (),
    tokenizer=None,
    check_every: int = 8,
    compile_step: bool | None = None,
    copies: int = 1,
) -> torch.Tensor:
    """New tokens for left-padded prompts `input_ids` / `attention_mask` [B, W], `copies` rows each, prompt-major.
    [B * copies, <= max_new_tokens]

    Each prompt is prefilled once, whatever `copies`. `compile_step` None compiles on CUDA only. `stop_strings` need
    the `tokenizer`; a row that has written one (or an end-of-sequence id) is finished: its later tokens are `pad_id`,
    and the loop ends when every row is finished. End-of-sequence ids cannot be drawn before `min_new_tokens` tokens.
    The model runs in eval mode without gradients (its mode is restored afterwards)."""
    if max_new_tokens < 1 or check_every < 1 or copies < 1:
        raise ValueError("max_new_tokens, check_every and copies must be at least 1")
    if stop_strings and tokenizer is None:
        raise ValueError("stop strings need the tokenizer")
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), packed_gqa(model):
            return _decode(
                model, input_ids, attention_mask, max_new_tokens=max_new_tokens, eos_ids=eos_ids, pad_id=pad_id,
                choose={"do_sample": do_sample, "temperature": temperature, "top_k": top_k, "top_p": top_p},
                min_new_tokens=min_new_tokens, stop_strings=stop_strings, tokenizer=tokenizer, check_every=check_every,
                compile_step=device_compiles(input_ids.device) if compile_step is None else compile_step, copies=copies,
            )  # fmt: skip
    finally:
        model.train(was_training)


def device_compiles(device: torch.device) -> bool:
    """Whether decoding compiles its step by default on `device`: on CUDA, where CUDA graphs pay for the compile."""
    return device.type == "cuda"


def shared_prefill(model, input_ids, attention_mask, cache: StaticCache, copies: int) -> torch.Tensor:
    """Run the prompts [B, W] through the model once and write their keys and values into `cache`'s first W positions,
    each prompt's into `copies` consecutive rows ([B * copies] rows); the last position's logits, one row per sample.
    """
    batch, width = input_ids.shape
    prompt_cache = StaticCache(config=model.config, max_cache_len=width)  # [B] rows: the prompts alone
    positions = position_ids(attention_mask)  # [B, W]
    logits = model(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=positions, past_key_values=prompt_cache,
        logits_to_keep=1,
    ).logits[:, -1]  # fmt: skip
    for index, layer in enumerate(prompt_cache.layers):  # `cache` is empty: a static layer writes at its first W slots
        keys, values = layer.keys.repeat_interleave(copies, 0), layer.values.repeat_interleave(copies, 0)
        cache.update(keys, values, index)  # and counts them, as the model's own prefill would
    return logits.repeat_interleave(copies, 0)


def _decode(
    model, input_ids, attention_mask, *, max_new_tokens: int, eos_ids: Sequence[int], pad_id: int, choose: dict,
    min_new_tokens: int, stop_strings: Sequence[str], tokenizer, check_every: int, compile_step: bool, copies: int,
) -> torch.Tensor:  # fmt: skip
    device = input_ids.device
    prompts, width = input_ids.shape
    batch = prompts * copies
    cache, length = static_cache_for(model, batch, width + max_new_tokens)
    prompt_mask = attention_mask.repeat_interleave(copies, 0)  # [B, W], B = prompts * copies
    mask = torch.ones((batch, length), dtype=attention_mask.dtype, device=device)  # [B, L]: later positions are
    mask[:, :width] = prompt_mask  # hidden by causality until written
    next_position = prompt_mask.sum(-1)  # [B]: position of each row's first new token
    eos = torch.tensor(list(eos_ids), device=device)

    def pick(logits: torch.Tensor, index: int) -> torch.Tensor:  # logits [B, V] -> tokens [B]
        if index < min_new_tokens:
            logits = logits.float().index_fill(-1, eos, float("-inf"))
        return next_tokens(logits, **choose)

    out = torch.full((batch, max_new_tokens), pad_id, dtype=torch.long, device=device)  # [B, N]
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    if copies == 1:  # nothing to share: prefill straight into the loop's cache, without a second prompt-sized one
        positions = position_ids(attention_mask)  # [B, W]
        logits = model(
            input_ids=input_ids, attention_mask=mask, position_ids=positions, past_key_values=cache, logits_to_keep=1
        ).logits[:, -1]
    else:
        logits = shared_prefill(model, input_ids, attention_mask, cache, copies)  # [B, V]
    step = compiled_forward(model, compile_step)
    written = 0
    for index in range(max_new_tokens):
        token = torch.where(finished, pad_id, pick(logits, index))  # [B]
        out[:, index] = token
        finished |= torch.isin(token, eos)
        written = index + 1
        if written == max_new_tokens:
            break
        if written % check_every == 0 and _all_finished(out[:, :written], finished, tokenizer, stop_strings):
            break
        if compile_step:
            torch.compiler.cudagraph_mark_step_begin()
        logits = step(
            input_ids=token[:, None],
            attention_mask=mask,
            position_ids=(next_position + index)[:, None],
            past_key_values=cache,
            logits_to_keep=1,
        ).logits[:, -1]
    return out[:, :written]


def _all_finished(tokens: torch.Tensor, finished: torch.Tensor, tokenizer, stop_strings: Sequence[str]) -> bool:
    """Marks the rows that have written a stop string as finished (in place) and says whether every row is."""
    if stop_strings:
        open_rows = (~finished).nonzero().flatten().tolist()
        stopped = _rows_with_stop(tokens, tokenizer, stop_strings, open_rows) if open_rows else []
        if stopped:
            finished[stopped] = True
    return bool(finished.all())
