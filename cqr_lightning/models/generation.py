"""Batched generation returning, per sample, the exact tokens a policy-gradient step needs.

Every decoding setting is passed explicitly: values a checkpoint's own `generation_config` would add
(Qwen2.5 ships `repetition_penalty=1.05` and `top_k=20`) are overridden, so that sampling follows the
temperature / top-p distribution the training loss assumes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from cqr_lightning.models.decode_loop import decode

STOP_REWRITE = ("</rewrite>",)


@dataclass(frozen=True)
class GeneratedSample:
    """One sampled response.

    `response_ids` stop right after the token that completes a stop string, exclude EOS and hold no
    padding. `text` is their decoding without special tokens, cut right after the stop string (a token
    may carry characters past it). `finish_reason` is "stop" (stop string), "eos" or "length".
    """

    prompt_index: int
    prompt_ids: tuple[int, ...]
    response_ids: tuple[int, ...]
    text: str
    finish_reason: str


def texts_by_prompt(samples: Sequence[GeneratedSample], n_prompts: int) -> list[list[str]]:
    """Each prompt's sampled texts, in the order `generate` returned them (`generate` may interleave prompts)."""
    texts: list[list[str]] = [[] for _ in range(n_prompts)]
    for sample in samples:
        texts[sample.prompt_index].append(sample.text)
    return texts


def _decode(tokenizer, token_ids: Sequence[int]) -> str:
    return tokenizer.decode(list(token_ids), skip_special_tokens=True)


def _first_stop_end(text: str, stop_strings: Sequence[str]) -> int | None:
    """Character offset right after the earliest stop string in `text`, or None."""
    ends = [text.find(stop) + len(stop) for stop in stop_strings if stop and stop in text]
    return min(ends) if ends else None


def truncate_at_stop(token_ids: Sequence[int], tokenizer, stop_strings: Sequence[str]) -> tuple[list[int], bool]:
    """Cut `token_ids` right after the first token whose decoded prefix contains a stop string.

    Returns the kept ids and whether a stop string was found. A binary search over prefix lengths needs
    about log2(len) decodes; it relies on "the decoded prefix contains a stop string" never turning false
    as the prefix grows, which holds for tokenizers whose decoding of a prefix is a prefix of the decoding.
    """
    ids = list(token_ids)
    if not stop_strings or _first_stop_end(_decode(tokenizer, ids), stop_strings) is None:
        return ids, False
    low, high = 1, len(ids)
    while low < high:
        middle = (low + high) // 2
        if _first_stop_end(_decode(tokenizer, ids[:middle]), stop_strings) is None:
            low = middle + 1
        else:
            high = middle
    return ids[:low], True


def eos_token_ids(model, tokenizer) -> list[int]:
    """The end-of-sequence ids of the model's generation config and of the tokenizer, merged."""
    ids: list[int] = []
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for value in (configured, tokenizer.eos_token_id):
        for token_id in value if isinstance(value, list | tuple) else [value]:
            if token_id is not None and token_id not in ids:
                ids.append(int(token_id))
    return ids


def static_prompt_width(longest: int, cap: int, bucket: int | None = None) -> int:
    """Prompt width a static-cache `generate` call pads its batch to: `cap` (every call the same shape), or with
    `bucket` the batch's longest prompt rounded up to a multiple of `bucket`, at most `cap`, so the KV cache and
    every decoding step's attention cover the prompts plus a bucket's slack rather than the longest prompt allowed.
    A prompt longer than `cap` is never cut. Widths stay on a grid: at most ceil(cap / bucket) + 1 shapes."""
    if bucket is None:
        return max(longest, cap)
    if bucket < 1:
        raise ValueError(f"static prompt bucket must be a positive token count or None, got {bucket}")
    return max(longest, min(cap, -(-longest // bucket) * bucket))


def _left_pad(
    rows: Sequence[Sequence[int]], pad_id: int, device, min_width: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(min_width, *(len(row) for row in rows))
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, width - len(row) :] = torch.tensor(row, dtype=torch.long)
        attention_mask[i, width - len(row) :] = 1
    return input_ids.to(device), attention_mask.to(device)


def _finish(
    prompt_index: int, prompt_ids: Sequence[int], generated: Sequence[int], tokenizer, eos_ids, stop_strings
) -> GeneratedSample:
    ids = list(generated)
    reason = "length"
    eos_at = next((i for i, token in enumerate(ids) if token in eos_ids), None)
    if eos_at is not None:
        ids, reason = ids[:eos_at], "eos"
    ids, stopped = truncate_at_stop(ids, tokenizer, stop_strings)
    text = _decode(tokenizer, ids)
    if stopped:
        reason = "stop"
        text = text[: _first_stop_end(text, stop_strings)]
    return GeneratedSample(prompt_index, tuple(prompt_ids), tuple(ids), text, reason)


def _rng_scope(seed: int | None, device: torch.device):
    """Seed torch for this call only, leaving the global random state as it was."""
    if seed is None:
        return contextlib.nullcontext()
    devices = [device] if device.type == "cuda" else []
    scope = torch.random.fork_rng(devices=devices)

    @contextlib.contextmanager
    def seeded():
        with scope:
            torch.manual_seed(seed)
            yield

    return seeded()


def generate(
    model,
    tokenizer,
    prompts: Sequence[str],
    *,
    max_new_tokens: int,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    num_return_sequences: int = 1,
    stop_strings: Sequence[str] = STOP_REWRITE,
    min_new_tokens: int = 0,
    batch_size: int | None = None,
    seed: int | None = None,
    static_cache_width: int | None = None,
    static_cache_bucket: int | None = None,
    decode_loop: bool = False,
) -> list[GeneratedSample]:
    """Sample `num_return_sequences` responses for each prompt, in prompt order.

    `prompts` are already rendered with the chat template, so no special tokens are added when encoding.
    `batch_size` counts prompts per `model.generate` call (each expands to `num_return_sequences` rows);
    None means all at once. `top_k=0` turns top-k filtering off. With `seed` the call is reproducible and
    leaves torch's global random state untouched; without it, it follows the global state
    (`torch.manual_seed` before the call makes it reproducible). The model runs in eval mode, without
    gradients and with the KV cache; its previous train/eval mode is restored afterwards.

    `static_cache_width` switches to transformers' static KV cache with every batch left-padded to at least that
    many prompt tokens, so each call has the same shapes: on a GPU, `generate` then compiles the decoding step
    once (CUDA graphs) instead of launching every kernel from Python at every token. Outputs are unchanged.
    `static_cache_bucket` pads each batch only to its longest prompt rounded up to that many tokens (at most
    `static_cache_width`; `static_prompt_width`): less prefill, and a KV cache as long as the prompts need. transformers
    (pinned) keeps the largest static cache a model has built, so the cache grows to the widest bucket met so far
    and never shrinks: decoding compiles once per growth, not once per call.
    `decode_loop` (with `static_cache_width`) decodes with this package's own loop (`decode_loop.decode`: one compiled
    forward per token, sampling and end checks on the GPU) instead of `model.generate`: the same greedy tokens, samples
    from the same distribution with other random numbers.
    """
    if max_new_tokens < 1 or num_return_sequences < 1:
        raise ValueError("max_new_tokens and num_return_sequences must be at least 1")
    if decode_loop and static_cache_width is None:
        raise ValueError("our decoding loop runs over a static cache: it needs static_cache_width")
    if not prompts:
        return []
    encoded = tokenizer(list(prompts), add_special_tokens=False)["input_ids"]
    empty = [i for i, row in enumerate(encoded) if not row]
    if empty:
        raise ValueError(f"prompts {empty[:5]} encode to no tokens")
    eos_ids = eos_token_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0]
    stops = [stop for stop in stop_strings if stop]
    options: dict = {
        "max_new_tokens": max_new_tokens,
        "min_new_tokens": min_new_tokens,
        "do_sample": do_sample,
        "num_return_sequences": num_return_sequences,
        "eos_token_id": eos_ids,
        "pad_token_id": pad_id,
        "repetition_penalty": 1.0,
        "use_cache": True,
    }
    if do_sample:
        options.update(temperature=temperature, top_p=top_p, top_k=top_k)
    if stops:
        options.update(stop_strings=stops, tokenizer=tokenizer)
    if static_cache_width is not None:
        options["cache_implementation"] = "static"

    step = batch_size or len(encoded)
    device = model.device
    was_training = model.training
    samples: list[GeneratedSample] = []
    model.eval()
    try:
        with torch.no_grad(), _rng_scope(seed, device):
            for start in range(0, len(encoded), step):
                batch = encoded[start : start + step]
                width = 0
                if static_cache_width is not None:
                    width = static_prompt_width(max(map(len, batch)), static_cache_width, static_cache_bucket)
                input_ids, attention_mask = _left_pad(batch, pad_id, device, width)
                if decode_loop:
                    new_tokens = decode(
                        model,
                        input_ids,
                        attention_mask,
                        copies=num_return_sequences,  # one prefill a prompt, shared by its samples
                        max_new_tokens=max_new_tokens,
                        eos_ids=eos_ids,
                        pad_id=pad_id,
                        do_sample=do_sample,
                        temperature=temperature,
                        top_k=top_k,
                        top_p=top_p,
                        min_new_tokens=min_new_tokens,
                        stop_strings=stops,
                        tokenizer=tokenizer,
                    ).tolist()  # [B * n, <= max_new_tokens]
                else:
                    output = model.generate(input_ids=input_ids, attention_mask=attention_mask, **options)
                    new_tokens = output[:, input_ids.shape[1] :].tolist()  # [B * n, <= max_new_tokens]
                for row, generated in enumerate(new_tokens):
                    index = start + row // num_return_sequences
                    samples.append(_finish(index, encoded[index], generated, tokenizer, eos_ids, stops))
    finally:
        model.train(was_training)
    return samples
