"""Time one GRPO step of our RLModule at Qwen2.5-3B scale on a GPU (issue: single-GPU speed and memory).

Workload: a randomly initialised model with Qwen2.5-3B's architecture, 4-bit NF4 base + LoRA r=16 on every
linear layer, prompts from real conversations (the shared data pack) at their real lengths, G responses per
prompt with the response length forced (min = max new tokens), BM25 (bm25s) reward over the pack corpus.
Prompts are tokenised with a byte-level BPE trained here on the pack corpus (no hub tokenizer is reachable),
so prompt lengths are realistic but not Qwen's exact counts.

    python bench/grpo_step.py --data DIR --prompts 4 --group 8 --response 256 --steps 3 --out OUT

Prints and writes (OUT/grpo_step.json) the mean time per phase over the timed steps (the first is warm-up),
generated and trained tokens per second, and peak GPU memory.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import lightning as L
import torch
from omegaconf import OmegaConf

QWEN25_3B = dict(
    hidden_size=2048,
    num_hidden_layers=36,
    num_attention_heads=16,
    num_key_value_heads=2,
    intermediate_size=11008,
    vocab_size=151936,
    tie_word_embeddings=True,
    max_position_embeddings=32768,
    rope_theta=1_000_000.0,
    rms_norm_eps=1e-6,
)


# SmolLM2-135M-Instruct's architecture (the pack experiment's model), for the step at the real run's size
SMOLLM2_135M = dict(
    hidden_size=576,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    intermediate_size=1536,
    vocab_size=49152,
    tie_word_embeddings=True,
    max_position_embeddings=8192,
    rope_theta=100_000.0,
    rms_norm_eps=1e-5,
)
SHAPES = {"qwen2.5-3b": ("Qwen2Config", QWEN25_3B), "smollm2-135m": ("LlamaConfig", SMOLLM2_135M)}


def build_tokenizer(corpus: Path, out: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = [json.loads(line)["contents"] for line in corpus.open()]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tokenizer.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=32000, special_tokens=special))
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    fast.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    fast.padding_side = "left"
    fast.save_pretrained(out)


def build_model_dir(data: Path, out: Path, shape: str = "qwen2.5-3b") -> Path:
    """A random checkpoint of the shape's architecture (`SHAPES`) with the bench tokenizer, saved once."""
    import transformers
    from transformers import AutoModelForCausalLM

    if (out / "config.json").exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    build_tokenizer(data / "corpus.jsonl", out)
    torch.manual_seed(0)
    config_class, dims = SHAPES[shape]
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(getattr(transformers, config_class)(**dims), dtype=torch.bfloat16)
    model.save_pretrained(out)
    del model
    torch.cuda.empty_cache()
    return out


def long_context_split(data: Path) -> Path:
    """dev turns whose history is prefixed with other conversations' utterances (cut to fit the prompt)."""
    rows = [json.loads(line) for line in (data / "dev.jsonl").open()]
    filler = [u for row in rows[:40] for u in row["history"]]
    out = data / "long"
    out.mkdir(exist_ok=True)
    with (out / "dev.jsonl").open("w") as handle:
        for row in rows:
            handle.write(json.dumps({**row, "history": filler + row["history"]}) + "\n")
    return out


class Timings(L.Callback):
    def __init__(self):
        self.steps: list[dict[str, float]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        torch.cuda.synchronize()
        self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        torch.cuda.synchronize()
        row = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(("time/", "train/"))}
        row["step_seconds"] = time.perf_counter() - self.start
        free, total = torch.cuda.mem_get_info()
        row["device_used_gib"] = (total - free) / 2**30  # all memory on the card, PyTorch's allocator or not
        print(f"step {trainer.global_step}: {row['step_seconds']:.1f} s, device used {row['device_used_gib']:.1f} GiB")
        self.steps.append(row)


def mean_prompt_tokens(module, data_cfg, n: int) -> float:
    from data_modules.conversations import ConversationDataModule

    turns = [item[0] for item in ConversationDataModule(data_cfg).ordered_stream("dev", n)]
    return sum(len(module.tokenizer(p)["input_ids"]) for p in module.prompts(turns)) / len(turns)


def workload_parser() -> argparse.ArgumentParser:
    """The workload's settings, shared with bench/trl_grpo_step.py so both measure the same thing."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", type=Path, required=True, help="folder with corpus.jsonl and dev.jsonl")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="qwen2.5-3b", help="the random model's architecture")
    parser.add_argument("--model-dir", type=Path, default=None, help="default: /tmp/<shape>-random")
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--group", type=int, default=8)
    parser.add_argument("--response", type=int, default=256)
    parser.add_argument("--max-prompt", type=int, default=1536)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("."))
    return parser


def add_our_options(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Settings of our module only (bench/trl_grpo_step.py has no counterpart)."""
    parser.add_argument("--fast", action="store_true", help="sample from the merged bf16 copy (fast_sampling)")
    parser.add_argument("--static", action="store_true", help="static KV cache, compiled decoding (static_decoding)")
    parser.add_argument(
        "--static-bucket", type=int, default=None, help="with --static: rl.static_prompt_bucket (none: --max-prompt)"
    )
    parser.add_argument(
        "--loop", action="store_true", help="with --static: our decoding loop (rl.static_decoding_loop), not generate"
    )
    parser.add_argument("--long-context", action="store_true", help="long histories: prompts fill --max-prompt")
    parser.add_argument("--entropy-coef", type=float, default=0.0, help="rl.entropy_coef (0: no entropy pass)")
    parser.add_argument("--logprob-chunk-size", type=int, default=None, help="rl.logprob_chunk_size (none: off)")
    parser.add_argument(
        "--no-upcast", action="store_true", help="model.upcast_non_quantized=false: norms, embeddings, LM head in bf16"
    )
    parser.add_argument("--no-grad-ckpt", action="store_true", help="model.gradient_checkpointing=false")
    parser.add_argument(
        "--micro-batch-tokens", type=int, default=None, help="rl.micro_batch_tokens: a token budget a loss pass"
    )
    parser.add_argument(
        "--shared-prompts", action="store_true", help="rl.shared_prompt_passes: each prompt once a group in the loss"
    )
    return parser


def model_dir_of(args) -> Path:
    """--model-dir, or /tmp/<shape>-random (e.g. /tmp/qwen25-3b-random)."""
    return args.model_dir or Path(f"/tmp/{args.shape.replace('.', '')}-random")


def qwen_model_config(args):
    """conf/model/<shape>.yaml (qwen2.5-3b or smollm2-135m) pointed at the random checkpoint (built on first use)."""
    shape, model_dir = args.shape, model_dir_of(args)
    model_cfg = OmegaConf.load(Path(__file__).resolve().parent.parent / "conf" / "model" / f"{shape}.yaml")
    model_cfg.name_or_path = str(build_model_dir(args.data, model_dir, shape))
    model_cfg.max_prompt_length = args.max_prompt
    return model_cfg


def bench_model_config(args, tiny_cpu: bool = False):
    """The workload's model config: the random Qwen2.5-3B-shaped checkpoint, or with `tiny_cpu` the tiny test model
    on the CPU (conf/model/tiny.yaml, a dry run of a benchmark script)."""
    if not tiny_cpu:
        return qwen_model_config(args)
    model_cfg = OmegaConf.load(Path(__file__).resolve().parent.parent / "conf" / "model" / "tiny.yaml")
    model_cfg.max_prompt_length = args.max_prompt
    model_cfg.device = "cpu"
    return model_cfg


def workload_config(args, model_cfg):
    """The training config (conf/train.yaml) with the workload's settings; the rest as RLModule's own defaults were
    when this benchmark was first measured (think_rewrite prompts, no learning-rate warm-up)."""
    from cqr_lightning.config import compose_train_config

    cfg = compose_train_config(
        [
            "response_format=think_rewrite",
            f"rl.group_size={args.group}",
            f"rl.max_new_tokens={args.response}",
            f"+rl.min_new_tokens={args.response}",  # forced response lengths
            f"rl.micro_batch_size={args.micro_batch}",
            "rl.lr=1e-5",
            "rl.warmup_steps=0",
            f"rl.entropy_coef={args.entropy_coef}",
            f"rl.fast_sampling={args.fast}",
            f"rl.static_decoding={args.static}",
            f"rl.static_prompt_bucket={'null' if args.static_bucket is None else args.static_bucket}",
            f"rl.static_decoding_loop={args.static and args.loop}",
            f"rl.logprob_chunk_size={'null' if args.logprob_chunk_size is None else args.logprob_chunk_size}",
            f"rl.micro_batch_tokens={'null' if args.micro_batch_tokens is None else args.micro_batch_tokens}",
            f"rl.shared_prompt_passes={args.shared_prompts}",
        ]
    )
    cfg.model = model_cfg
    cfg.model.max_prompt_length = args.max_prompt
    cfg.model.upcast_non_quantized = not args.no_upcast
    if args.no_grad_ckpt:
        cfg.model.gradient_checkpointing = False
    return cfg


def build_module(args, model_cfg, module_class=None):
    """Our RLModule built from the workload's config by the builder train.py uses (cqr_lightning/builders.py), and
    the data module's config; (module, data_cfg). `module_class`: a subclass of RLModule to build instead."""
    from cqr_lightning.builders import build_module as build_stage_module
    from cqr_lightning.models.loading import load_policy, load_tokenizer
    from cqr_lightning.scoring import RetrievalScorer, open_reward_retriever
    from cqr_lightning.search import SearchPlan

    cfg = workload_config(args, model_cfg)
    policy, tokenizer = load_policy(cfg.model), load_tokenizer(cfg.model)
    if torch.cuda.is_available():
        free, total = torch.cuda.mem_get_info()
        used, by_torch = (total - free) / 2**30, torch.cuda.memory_allocated() / 2**30
        print(f"policy loaded: device used {used:.1f} GiB, torch {by_torch:.1f}")
    retriever_cfg = OmegaConf.create({"name": "bm25s", "k": 100, "max_query_words": 1024, "index_dir": None})
    retriever = open_reward_retriever(retriever_cfg, str(args.data / "corpus.jsonl"))
    scorer = RetrievalScorer(retriever, SearchPlan("rewrite", first_turn_as_asked=False))  # as TRL's reward
    module = build_stage_module(cfg, "rl", policy, tokenizer, scorer, target=module_class)
    data_dir = long_context_split(args.data) if args.long_context else args.data
    data_cfg = OmegaConf.create(
        {"format": "jsonl", "dir": str(data_dir), "corpus": str(args.data / "corpus.jsonl"),
         "train_split": "dev", "eval_split": "dev", "shuffle_buffer": 0, "seed": 0}
    )  # fmt: skip
    return module, data_cfg


def main() -> None:
    args = add_our_options(workload_parser()).parse_args()
    from data_modules.conversations import ConversationDataModule

    module, data_cfg = build_module(args, qwen_model_config(args))
    timings = Timings()
    torch.cuda.reset_peak_memory_stats()
    trainer = L.Trainer(
        accelerator="gpu", devices=1, max_steps=args.steps, logger=False, enable_checkpointing=False,
        limit_val_batches=0, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[timings],
    )  # fmt: skip
    trainer.fit(module, datamodule=ConversationDataModule(data_cfg, batch_size=args.prompts))
    timed = timings.steps[1:] or timings.steps
    summary = {
        "workload": vars(args) | {"data": str(args.data), "model_dir": str(model_dir_of(args)), "out": str(args.out)},
        "device": torch.cuda.get_device_name(),
        "steps_timed": len(timed),
        "mean": {k: sum(s[k] for s in timed) / len(timed) for k in timed[0]},
        "peak_allocated_gib": torch.cuda.max_memory_allocated() / 2**30,
        "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30,
        "mean_prompt_tokens": mean_prompt_tokens(module, data_cfg, args.prompts),
        "all_steps": timings.steps,
    }
    mean = summary["mean"]
    sequences = args.prompts * args.group
    summary["generated_tokens_per_s"] = mean["train/generated_tokens"] / mean["time/generation"]
    trained = sequences * (mean["train/response_tokens"])
    summary["trained_tokens_per_s"] = trained / (mean["time/forward_backward"] + mean.get("time/reference_logprobs", 0))
    args.out.mkdir(parents=True, exist_ok=True)
    variant = f"_{args.shape}" if args.shape != "qwen2.5-3b" else ""
    variant += ("_fast" if args.fast else "") + ("_static" if args.static else "")
    variant += f"_mb{args.micro_batch}" + ("_nockpt" if args.no_grad_ckpt else "")
    variant += f"_bucket{args.static_bucket}" if args.static and args.static_bucket else ""
    variant += "_loop" if args.static and args.loop else ""
    variant += f"_chunk{args.logprob_chunk_size}" if args.logprob_chunk_size else ""
    name = f"grpo_step_p{args.prompts}_g{args.group}_r{args.response}{variant}.json"
    (args.out / name).write_text(json.dumps(summary, indent=2))
    print(json.dumps({k: v for k, v in summary.items() if k != "all_steps"}, indent=2))


if __name__ == "__main__":
    main()
