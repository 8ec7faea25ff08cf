"""Peak memory of one loss pass (log-probs + entropy, forward and backward) with and without rl.logprob_chunk_size,
on the CPU: a one-layer random Llama with Qwen2.5's 151,936-token vocabulary, so the vocabulary-wide logits
dominate as they do at 3B scale. Each setting runs in its own process; the figure is the growth of the peak
resident memory over the model's own.

    python bench/logprob_memory_cpu.py --sequences 2 --response 1024 --chunk-sizes none,1024,256
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys

import torch
from transformers import LlamaConfig, LlamaForCausalLM

VOCAB = 151_936


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def one_pass(sequences: int, response: int, chunk_size: int | None) -> None:
    from cqr_lightning.grpo.rollout import pack_rollout, response_log_probs

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=True)  # fmt: skip
    model = LlamaForCausalLM(config).train()
    prompts = [torch.randint(0, VOCAB, (64,)).tolist() for _ in range(sequences)]
    responses = [torch.randint(0, VOCAB, (response,)).tolist() for _ in range(sequences)]
    rollout = pack_rollout(prompts, responses, pad_id=0)
    before = peak_rss_gib()
    logp, entropy = response_log_probs(model, rollout, 0.7, with_entropy=True, chunk_size=chunk_size)
    (logp.sum() + 0.001 * entropy.sum()).backward()
    print(f"chunk_size={chunk_size}: peak resident memory +{peak_rss_gib() - before:.2f} GiB over the model's")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sequences", type=int, default=2)
    parser.add_argument("--response", type=int, default=1024)
    parser.add_argument("--chunk-sizes", default="none,1024,256")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: run one setting here
    args = parser.parse_args()
    if args.one is not None:
        one_pass(args.sequences, args.response, None if args.one == "none" else int(args.one))
        return
    for size in args.chunk_sizes.split(","):
        command = [sys.executable, __file__, "--sequences", str(args.sequences), "--response", str(args.response)]
        subprocess.run([*command, "--one", size], check=True)


if __name__ == "__main__":
    main()
