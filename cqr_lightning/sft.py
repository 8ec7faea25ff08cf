"""Supervised fine-tuning batches and loss: prompt tokens are context only, response tokens are trained."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

IGNORE_INDEX = -100


def build_sft_batch(tokenizer, prompts: Sequence[str], responses: Sequence[str], max_length: int) -> dict[str, Tensor]:
    """Right-padded input ids with labels equal to the ids on response tokens (plus EOS), -100 elsewhere.

    Sequences longer than `max_length` lose the end of their response.
    """
    rows = []
    for prompt, response in zip(prompts, responses, strict=True):
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        response_ids = tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        ids = (prompt_ids + response_ids)[:max_length]
        labels = ([IGNORE_INDEX] * len(prompt_ids) + response_ids)[:max_length]
        rows.append((ids, labels))
    width = max(len(ids) for ids, _ in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (ids, row_labels) in enumerate(rows):
        input_ids[i, : len(ids)] = torch.as_tensor(ids)
        labels[i, : len(row_labels)] = torch.as_tensor(row_labels)
        attention_mask[i, : len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def response_token_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean next-token cross-entropy over positions whose label is not -100.

    logits [B, T, V] predict labels shifted by one: logits[:, t] scores labels[:, t + 1].
    """
    shifted_logits = logits[:, :-1, :].float()  # [B, T-1, V]
    shifted_labels = labels[:, 1:]  # [B, T-1]
    return F.cross_entropy(
        shifted_logits.reshape(-1, shifted_logits.shape[-1]), shifted_labels.reshape(-1), ignore_index=IGNORE_INDEX
    )
