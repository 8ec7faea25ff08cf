"""Response log-probs and entropies without the whole micro-batch's vocabulary-wide logits in memory.

The plain path (`rollout.response_log_probs` with no chunk size) asks the causal LM for the logits of every
response position at once: [N, R, V] (at Qwen2.5-3B's 151,936 entries, 4 x 1,024 x V float32 is 2.5 GB), plus
the temperature-scaled copy and what autograd keeps of both for the backward pass. Here the decoder runs
alone, the response positions' last hidden states [T, H] are gathered (T: real response tokens, so padding
costs nothing), and the LM head, temperature and log-softmax run on `chunk_size` tokens at a time. With
gradients each chunk is checkpointed: the backward pass recomputes that chunk's logits instead of keeping
them, so at most one chunk's logits exist at a time in either direction.

The per-token arithmetic is the plain path's (`losses.token_log_probs`, `losses.token_entropy`, the same
division by the temperature in the head's dtype), so values agree up to floating-point summation order.
Exact only for models whose logits are `lm_head(last hidden state)`; models that scale or soft-cap their
logits are refused.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from cqr_lightning.grpo.losses import token_entropy, token_log_probs

LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling")


def decoder_and_head(model) -> tuple[nn.Module, nn.Module]:
    """The decoder stack (returning last hidden states) and the LM head of a causal LM, peft-wrapped or not."""
    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = causal_lm.config
    transforms = [name for name in LOGIT_TRANSFORMS if getattr(config, name, None) not in (None, 1.0)]
    if transforms:
        raise ValueError(
            f"{type(causal_lm).__name__} transforms its logits ({', '.join(transforms)}), which chunked log-probs "
            "do not reproduce; set rl.logprob_chunk_size=null"
        )
    return causal_lm.get_decoder(), causal_lm.get_output_embeddings()


def head_token_stats(
    head: nn.Module, hidden: Tensor, labels: Tensor, temperature: float, with_entropy: bool
) -> tuple[Tensor, Tensor | None]:
    """Log-prob of `labels` [T] (and entropy) under softmax(head(hidden) / temperature), hidden [T, H]."""
    logits = head(hidden)  # [T, V]
    if temperature != 1.0:
        logits = logits / temperature
    logp = token_log_probs(logits.unsqueeze(0), labels.unsqueeze(0)).squeeze(0)  # [T]
    entropy = token_entropy(logits.unsqueeze(0)).squeeze(0) if with_entropy else None  # [T]
    return logp, entropy


def chunked_token_stats(
    head: nn.Module,
    hidden: Tensor,
    labels: Tensor,
    temperature: float,
    chunk_size: int,
    with_entropy: bool,
) -> tuple[Tensor, Tensor | None]:
    """`head_token_stats` over `chunk_size` tokens at a time; each chunk is recomputed in backward, not stored."""
    if chunk_size < 1:
        raise ValueError(f"rl.logprob_chunk_size must be a positive number of tokens or null, got {chunk_size}")
    recompute = torch.is_grad_enabled()
    logps, entropies = [], []
    for start in range(0, hidden.shape[0], chunk_size):
        part = (head, hidden[start : start + chunk_size], labels[start : start + chunk_size], temperature, with_entropy)
        if recompute:
            logp, entropy = checkpoint(head_token_stats, *part, use_reentrant=False)
        else:
            logp, entropy = head_token_stats(*part)
        logps.append(logp)
        entropies.append(entropy)
    if not logps:
        empty = hidden.new_zeros(0, dtype=torch.float32)
        return empty, (empty if with_entropy else None)
    return torch.cat(logps), (torch.cat(entropies) if with_entropy else None)


def chunked_response_log_probs(
    model, rollout, positions: Tensor, temperature: float, with_entropy: bool, chunk_size: int
) -> tuple[Tensor, Tensor | None]:
    """[N, R] log-probs (and entropies) of the rollout's response tokens; 0.0 at padded response positions."""
    decoder, head = decoder_and_head(model)
    hidden = decoder(
        input_ids=rollout.input_ids, attention_mask=rollout.attention_mask, position_ids=positions, use_cache=False
    ).last_hidden_state  # [N, P + R, H]
    width, start = rollout.response_mask.shape[1], rollout.prompt_width - 1
    keep = rollout.response_mask.bool()  # [N, R]
    predicting = hidden[:, start : start + width][keep]  # [T, H]: the states that predict the real response tokens
    labels = rollout.input_ids[:, rollout.prompt_width :][keep]  # [T]
    logp, entropy = chunked_token_stats(head, predicting, labels, temperature, chunk_size, with_entropy)
    zeros = torch.zeros(keep.shape, dtype=logp.dtype, device=logp.device)  # [N, R]
    return zeros.masked_scatter(keep, logp), (zeros.masked_scatter(keep, entropy) if with_entropy else None)
