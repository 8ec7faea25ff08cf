"""Time our decoding loop alone (cqr_lightning/models/decode_loop.py) at Qwen2.5-3B scale on a GPU, with grouped-query
attention packed (the default) or with transformers' copy of each key/value head per query head (`--copied`), and
each prompt prefilled once for its `--copies` samples (the default) or once per sample (`--separate-prefill`).

    python bench/decode_step.py [--copied] [--separate-prefill] [--rows 32] [--copies 1] [--width 256]
                                [--tokens 256] [--repeats 3] [--shape qwen2.5-3b|smollm2-135m] [--cpu] [--out OUT]

The model is a randomly initialised bf16 model of the shape built on the GPU (what GRPO samples from with
`rl.fast_sampling`: the merged bf16 copy), the prompts are `--rows / --copies` random token sequences left-padded to
`--width` (lengths drawn between half and all of it), each sampled `--copies` times (GRPO's G), and every row writes
`--tokens` tokens (no end id can be drawn), sampled at T = 0.7 by the compiled loop (CUDA graphs). The first call
compiles and is not timed. `--cpu` runs float32 on the CPU, uncompiled (the bound is then not meaningful). Prints and
writes OUT/decode_step*.json: milliseconds a decoding step (the calls' wall time over their tokens, prefill
included) and that step's share of the bandwidth bound (the bf16 weights and the whole static cache read once a
token at 4.8 TB/s, as bench/RESULTS.md counts it).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent))
from grpo_step import SHAPES  # noqa: E402

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
    parser.add_argument("--separate-prefill", action="store_true", help="prefill every sample's copy of its prompt")
    parser.add_argument("--rows", type=int, default=32, help="sequences decoded together (prompts x copies)")
    parser.add_argument("--copies", type=int, default=1, help="samples of each prompt (GRPO's G)")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="qwen2.5-3b")
    parser.add_argument("--cpu", action="store_true", help="float32 on the CPU, uncompiled")
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("."))
    args = parser.parse_args()
    if args.copied:  # the loop as it was before packed_gqa: attention left to transformers' sdpa function
        decode_loop.packed_gqa = lambda model: contextlib.nullcontext(False)

    if args.rows % args.copies:
        parser.error("--rows must be a multiple of --copies")
    device, dtype = ("cpu", torch.float32) if args.cpu else ("cuda", torch.bfloat16)
    config_class, shape = SHAPES[args.shape]
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(getattr(transformers, config_class)(**shape), dtype=dtype)
    model.config._attn_implementation = "sdpa"
    prompts = args.rows // args.copies
    lengths = torch.randint(args.width // 2, args.width + 1, (prompts,))
    positions = torch.arange(args.width)
    mask = (positions[None, :] >= args.width - lengths[:, None]).long().to(device)  # left padding
    ids = torch.randint(0, model.config.vocab_size, (prompts, args.width), device=device) * mask
    copies = args.copies
    if args.separate_prefill:  # the loop as it was: every sample's row prefilled on its own
        ids, mask, copies = ids.repeat_interleave(copies, 0), mask.repeat_interleave(copies, 0), 1
    options = {"max_new_tokens": args.tokens, "eos_ids": [model.config.vocab_size], "pad_id": 0, "do_sample": True,
               "temperature": 0.7, "compile_step": not args.cpu, "copies": copies}  # fmt: skip
    synchronize = torch.cuda.synchronize if not args.cpu else lambda: None

    started = time.perf_counter()
    decode_loop.decode(model, ids, mask, **options)
    compile_s = time.perf_counter() - started
    times = []
    for _ in range(args.repeats):
        synchronize()
        started = time.perf_counter()
        out = decode_loop.decode(model, ids, mask, **options)
        synchronize()
        times.append(time.perf_counter() - started)
        assert out.shape == (args.rows, args.tokens)
    ms_per_step = 1e3 * min(times) / args.tokens
    bound = bandwidth_bound_ms(model, args.rows, args.width + args.tokens)
    result = {
        "attention": "copied" if args.copied else "packed",
        "prefill": "separate" if args.separate_prefill else "shared", "shape": args.shape, "device": device,
        "rows": args.rows, "copies": args.copies, "width": args.width, "tokens": args.tokens,
        "first_call_s": round(compile_s, 1), "calls_s": [round(t, 3) for t in times],
        "ms_per_decoding_step": round(ms_per_step, 2), "bound_ms": round(bound, 2),
        "share_of_bound": round(bound / ms_per_step, 3),
        "peak_allocated_gib": None if args.cpu else round(torch.cuda.max_memory_allocated() / 2**30, 1),
        "versions": f"torch {torch.__version__}, transformers {transformers.__version__}",
    }  # fmt: skip
    print(json.dumps(result))
    args.out.mkdir(parents=True, exist_ok=True)
    name = f"decode_step_{result['attention']}_{result['prefill']}_{args.shape}_c{args.copies}_{device}.json"
    (args.out / name).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
