"""Time our decoding loop alone (cqr_lightning/models/decode_loop.py) at Qwen2.5-3B scale on a GPU, with grouped-query
attention packed (the default) or with transformers' copy of each key/value head per query head (`--copied`).

    python bench/decode_step.py [--copied] [--rows 32] [--width 256] [--tokens 256] [--repeats 3] [--out OUT]

The model is a randomly initialised bf16 model of Qwen2.5-3B's shape built on the GPU (what GRPO samples from with
`rl.fast_sampling`: the merged bf16 copy), the prompts are random token ids left-padded to `--width` (lengths drawn
between half and all of it), and every row writes `--tokens` tokens (no end id can be drawn), sampled at T = 0.7 by
the compiled loop (CUDA graphs). The first call compiles and is not timed. Prints and writes OUT/decode_step*.json:
milliseconds a decoding step (the calls' wall time over their tokens, prefill included) and that step's share of
the bandwidth bound (the bf16 weights and the whole static cache read once a token at 4.8 TB/s, as bench/RESULTS.md
counts it).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, Qwen2Config

sys.path.insert(0, str(Path(__file__).resolve().parent))
from grpo_step import QWEN25_3B  # noqa: E402

from cqr_lightning.models import decode_loop  # noqa: E402

H200_BYTES_PER_S = 4.8e12


def bandwidth_bound_ms(model, rows: int, cache_length: int) -> float:
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    cfg = model.config
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    cache = rows * cache_length * cfg.num_key_value_heads * head_dim * 2 * cfg.num_hidden_layers * 2  # K and V, bf16
    return 1e3 * (weights + cache) / H200_BYTES_PER_S


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--copied", action="store_true", help="transformers' repeat_kv instead of packed attention")
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("."))
    args = parser.parse_args()
    if args.copied:  # the loop as it was before packed_gqa: attention left to transformers' sdpa function
        decode_loop.packed_gqa = lambda model: contextlib.nullcontext(False)

    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(Qwen2Config(**QWEN25_3B), dtype=torch.bfloat16)
    model.config._attn_implementation = "sdpa"
    lengths = torch.randint(args.width // 2, args.width + 1, (args.rows,))
    positions = torch.arange(args.width)
    mask = (positions[None, :] >= args.width - lengths[:, None]).long().cuda()  # left padding
    ids = torch.randint(0, model.config.vocab_size, (args.rows, args.width), device="cuda") * mask
    options = {"max_new_tokens": args.tokens, "eos_ids": [model.config.vocab_size], "pad_id": 0, "do_sample": True,
               "temperature": 0.7, "compile_step": True}  # fmt: skip

    started = time.perf_counter()
    decode_loop.decode(model, ids, mask, **options)
    compile_s = time.perf_counter() - started
    times = []
    for _ in range(args.repeats):
        torch.cuda.synchronize()
        started = time.perf_counter()
        out = decode_loop.decode(model, ids, mask, **options)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
        assert out.shape == (args.rows, args.tokens)
    ms_per_step = 1e3 * min(times) / args.tokens
    bound = bandwidth_bound_ms(model, args.rows, args.width + args.tokens)
    result = {
        "attention": "copied" if args.copied else "packed",
        "rows": args.rows, "width": args.width, "tokens": args.tokens,
        "first_call_s": round(compile_s, 1), "calls_s": [round(t, 3) for t in times],
        "ms_per_decoding_step": round(ms_per_step, 2), "bound_ms": round(bound, 2),
        "share_of_bound": round(bound / ms_per_step, 3),
        "peak_allocated_gib": round(torch.cuda.max_memory_allocated() / 2**30, 1),
        "versions": f"torch {torch.__version__}, transformers {__import__('transformers').__version__}",
    }  # fmt: skip
    print(json.dumps(result))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"decode_step_{result['attention']}.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
