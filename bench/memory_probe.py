"""Where does GPU memory outside PyTorch's allocator go during a GRPO step? Prints card-wide use per phase.

python bench/memory_probe.py --model-dir DIR   (a folder written by bench/grpo_step.py)
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from omegaconf import OmegaConf


def report(label: str) -> None:
    free, total = torch.cuda.mem_get_info()
    print(
        f"{label:<28} card used {(total - free) / 2**30:6.1f} GiB | torch allocated "
        f"{torch.cuda.memory_allocated() / 2**30:6.1f} reserved {torch.cuda.memory_reserved() / 2**30:6.1f}",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model-dir", type=Path, default=Path("/tmp/qwen25-3b-random"))
    args = parser.parse_args()
    from cqr_lightning.grpo.rollout import pack_rollout, response_log_probs
    from cqr_lightning.models.generation import generate
    from cqr_lightning.models.loading import load_policy, load_tokenizer
    from cqr_lightning.models.merged_sampler import MergedSampler

    report("start")
    cfg = OmegaConf.load(Path(__file__).resolve().parent.parent / "conf" / "model" / "qwen2.5-3b.yaml")
    cfg.name_or_path = str(args.model_dir)
    policy, tokenizer = load_policy(cfg), load_tokenizer(cfg)
    report("policy (4-bit + LoRA)")
    prompts = ["<|im_start|>user\n" + "word " * 1000 + "<|im_end|>\n<|im_start|>assistant\n"] * 2
    options = {"max_new_tokens": 32, "min_new_tokens": 32, "num_return_sequences": 8, "do_sample": True}
    samples = generate(policy, tokenizer, prompts, **options)
    report("generate from 4-bit policy")
    sampler = MergedSampler(policy)
    report("merged bf16 copy")
    samples = generate(sampler.model, tokenizer, prompts, **options)
    report("generate from merged copy")
    torch.cuda.empty_cache()
    report("after empty_cache")
    rollout = pack_rollout([s.prompt_ids for s in samples], [s.response_ids for s in samples], 0).to("cuda")
    policy.train()
    logp, _ = response_log_probs(policy, rollout.select(slice(0, 4)))
    report("forward (4 sequences)")
    logp.sum().backward()
    report("backward")
    sampler.sync()
    report("sync")


if __name__ == "__main__":
    main()
