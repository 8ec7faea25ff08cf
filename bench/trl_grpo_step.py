"""The GRPO step workload of bench/grpo_step.py through TRL's GRPOTrainer, for comparison.

Same random Qwen2.5-3B-shaped checkpoint (built by bench/grpo_step.py), NF4 base with double quantisation,
LoRA r=16 on all linear layers, the same prompts rendered by our prompt code, G responses per prompt with
the length forced, the same rank-incentive bm25s reward, learning rate, KL weight and token-mean loss
("dapo" in TRL: normalised by the active tokens of the global batch). No vLLM.

    python bench/trl_grpo_step.py --data DIR --prompts 4 --group 8 --response 256 --steps 3 --out OUT [--unsloth]

--unsloth runs the same trainer as Unsloth patches it: Unsloth's 4-bit loading and LoRA (its gradient checkpointing,
LoRA dropout 0, which its fast path expects), imported before TRL, transformers and peft. It needs the wheels of
`bash bench/prepare_device_carry.sh --unsloth-wheels` (TRL 1.15 and datasets 4.8, the newest Unsloth 2026.10.9
accepts) ahead of the others on PYTHONPATH, and, like the TRL run, the random checkpoint bench/grpo_step.py builds.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]  # all linear but the head


def step_times(label: str):
    """A callback timing each optimizer step (built here so that Unsloth can be imported before transformers)."""
    from transformers import TrainerCallback

    class StepTimes(TrainerCallback):
        def __init__(self):
            self.seconds: list[float] = []

        def on_step_begin(self, args, state, control, **kwargs):
            torch.cuda.synchronize()
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            torch.cuda.synchronize()
            self.seconds.append(time.perf_counter() - self.start)
            print(f"{label} step {state.global_step}: {self.seconds[-1]:.1f} s", flush=True)

    return StepTimes()


def load_unsloth_policy(model_dir: Path, max_seq_length: int, rank: int, alpha: int):
    """Unsloth's NF4 base with its LoRA on every linear layer, as GRPOTrainer gets it."""
    from unsloth import FastLanguageModel

    model, _ = FastLanguageModel.from_pretrained(
        model_name=str(model_dir),
        max_seq_length=max_seq_length,
        dtype=torch.bfloat16,
        load_in_4bit=True,
        fast_inference=False,  # no vLLM, as for ours and TRL's
    )
    return FastLanguageModel.get_peft_model(
        model,
        r=rank,
        lora_alpha=alpha,
        lora_dropout=0.0,
        target_modules=LORA_TARGETS,
        use_gradient_checkpointing="unsloth",
        random_state=0,
    )


def main() -> None:
    from grpo_step import model_dir_of, workload_parser  # bench/ is the script's folder, so it is importable

    parser = workload_parser()
    parser.add_argument("--unsloth", action="store_true", help="Unsloth's loading and LoRA, and its patched trainer")
    args = parser.parse_args()
    args.model_dir = model_dir_of(args)
    if args.unsloth:
        import unsloth  # noqa: F401  (first: it patches TRL, transformers and peft as they are imported)

    from datasets import Dataset
    from peft import LoraConfig
    from trl import GRPOConfig, GRPOTrainer

    from cqr_lightning.formatting import parse_response
    from cqr_lightning.grpo.rewards import rank_incentive_reward
    from cqr_lightning.models.loading import load_base_model, load_tokenizer
    from cqr_lightning.prompts import render_prompt
    from cqr_lightning.readers import read_jsonl_turns
    from cqr_lightning.retrieval.factory import open_retriever

    model_cfg = OmegaConf.load(Path(__file__).resolve().parent.parent / "conf" / "model" / "qwen2.5-3b.yaml")
    model_cfg.name_or_path = str(args.model_dir)
    tokenizer = load_tokenizer(model_cfg)
    turns = list(read_jsonl_turns(args.data / "dev.jsonl"))
    n_turns = args.prompts * (args.steps + 1)
    prompts = [render_prompt(tokenizer, t, args.max_prompt) for t in turns[:n_turns]]
    dataset = Dataset.from_list([{"prompt": p, "turn_index": i} for i, p in enumerate(prompts)])
    retriever = open_retriever({"name": "bm25s", "k": 100, "max_query_words": 1024}, args.data / "corpus.jsonl")

    def retrieval_reward(completions, turn_index, **kwargs) -> list[float]:
        parsed = [parse_response(text) for text in completions]
        ranks = retriever.best_gold_ranks(
            [p.rewrite or "" for p in parsed], [turns[i].positives for i in turn_index], k=100
        )
        return [rank_incentive_reward(r, p.format_ok) for r, p in zip(ranks, parsed, strict=True)]

    sequences = args.prompts * args.group
    config = GRPOConfig(
        output_dir=str(args.out / "trl"),
        per_device_train_batch_size=args.micro_batch,
        gradient_accumulation_steps=sequences // args.micro_batch,
        num_generations=args.group,
        max_completion_length=args.response,
        generation_kwargs={"min_new_tokens": args.response},
        temperature=0.7,
        top_p=1.0,
        learning_rate=1e-5,
        beta=0.001,
        loss_type="dapo",
        num_iterations=1,
        gradient_checkpointing=not args.unsloth,  # Unsloth's LoRA brings its own (use_gradient_checkpointing)
        bf16=True,
        max_steps=args.steps,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        use_vllm=False,
        shuffle_dataset=False,
    )
    lora = model_cfg.lora  # our run's LoRA (conf/model/qwen2.5-3b.yaml): r 16, alpha 32
    if args.unsloth:
        model = load_unsloth_policy(args.model_dir, args.max_prompt + args.response, lora.r, lora.alpha)
        peft_config = None  # the model carries its LoRA already
    else:
        model = load_base_model(model_cfg)
        peft_config = LoraConfig(
            r=lora.r, lora_alpha=lora.alpha, lora_dropout=0.05, target_modules="all-linear", task_type="CAUSAL_LM"
        )
    label = "Unsloth" if args.unsloth else "TRL"
    times = step_times(label)
    torch.cuda.reset_peak_memory_stats()
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=retrieval_reward,
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=[times],
    )
    trainer.train()
    timed = times.seconds[1:] or times.seconds
    summary = {
        "trainer": label,
        "workload": {k: str(v) for k, v in vars(args).items()},
        "device": torch.cuda.get_device_name(),
        "step_seconds": sum(timed) / len(timed),
        "all_steps": times.seconds,
        "peak_allocated_gib": torch.cuda.max_memory_allocated() / 2**30,
        "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    name = f"{label.lower()}_grpo_step_p{args.prompts}_g{args.group}_r{args.response}.json"
    (args.out / name).write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
