"""Pack sampled responses into tensors and score them with the policy.

A rollout of N sequences is laid out as left-padded prompts followed by right-padded responses:

    input_ids      [N, P + R]   pad ... prompt | response ... pad
    attention_mask [N, P + R]
    response_mask  [N, R]       1 on real response tokens

so every response starts at column P, and the logits that predict it are columns P-1 .. P+R-2.
Position ids are derived from the attention mask, as generation does, so a training forward sees
the same positions the sampler saw.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from cqr_lightning.grpo.chunked_logprobs import chunked_response_log_probs
from cqr_lightning.grpo.losses import token_entropy, token_log_probs
from cqr_lightning.grpo.shared_prompts import shared_prompt_log_probs


@dataclass
class Rollout:
    input_ids: Tensor  # [N, P + R]
    attention_mask: Tensor  # [N, P + R]
    response_mask: Tensor  # [N, R]
    prompt_width: int  # P

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def select(self, index: slice | Tensor) -> Rollout:
        """A sub-batch without the columns that are padding in all its rows: cut to its longest response on the
        right and to its longest prompt on the left (positions come from the attention mask, so the values do not
        change; a micro-batch of short prompts no longer pays for the batch's longest)."""
        response_mask = self.response_mask[index]
        width = int(response_mask.sum(dim=1).max().item()) if response_mask.numel() else 0
        width = max(width, 1)
        end = self.prompt_width + width
        prompt_lengths = self.prompt_lengths()[index]
        longest_prompt = int(prompt_lengths.max().item()) if prompt_lengths.numel() else 0
        start = self.prompt_width - max(longest_prompt, 1)
        return Rollout(
            input_ids=self.input_ids[index, start:end],
            attention_mask=self.attention_mask[index, start:end],
            response_mask=response_mask[:, :width],
            prompt_width=self.prompt_width - start,
        )

    def prompt_lengths(self) -> Tensor:
        """Each row's prompt length in tokens."""
        return self.attention_mask[:, : self.prompt_width].sum(dim=1)

    def response_lengths(self) -> Tensor:
        """Each row's response length in tokens."""
        return self.response_mask.sum(dim=1)

    def micro_batches(self, size: int, max_tokens: int | None = None, at_least: int = 1) -> Iterator[Tensor]:
        """Row indices of micro-batches of at most `size` rows, and with `max_tokens` of at most that many tokens once
        `select`ed (`micro_batch_layout`): rows ordered by prompt length, longest first (rows with one prompt stay
        together), so each micro-batch is padded to prompts of about its own length. `at_least`: split further
        until there are that many (processes under DDP backpropagate the same number of micro-batches)."""
        layout = micro_batch_layout(
            self.prompt_lengths().tolist(), self.response_lengths().tolist(), size, max_tokens, at_least
        )
        for rows in layout:
            yield torch.tensor(rows, dtype=torch.long, device=self.input_ids.device)

    def to(self, device: torch.device | str) -> Rollout:
        return Rollout(
            self.input_ids.to(device), self.attention_mask.to(device), self.response_mask.to(device), self.prompt_width
        )


def micro_batch_layout(
    prompt_lengths: Sequence[int],
    response_lengths: Sequence[int],
    max_rows: int,
    max_tokens: int | None = None,
    at_least: int = 1,
) -> list[list[int]]:
    """Rows cut into micro-batches: taken by prompt length, longest first (ties in row order), each micro-batch
    closed when one more row would pass `max_rows` rows or `max_tokens` tokens, counted as `Rollout.select` pads
    them: rows x (longest prompt + longest response among them). A row longer than `max_tokens` alone is a
    micro-batch of its own. Then, while there are fewer than `at_least` (and a micro-batch has two rows), the one
    with the most rows (the first of those) is halved."""
    if max_rows < 1 or (max_tokens is not None and max_tokens < 1):
        raise ValueError(f"micro-batches need at least one row and one token (rows {max_rows}, tokens {max_tokens})")
    order = sorted(range(len(prompt_lengths)), key=lambda row: -prompt_lengths[row])
    layout: list[list[int]] = []
    longest_prompt = longest_response = 0
    for row in order:
        prompt, response = prompt_lengths[row], max(int(response_lengths[row]), 1)
        if layout and len(layout[-1]) < max_rows:
            width = max(longest_prompt, prompt) + max(longest_response, response)
            if max_tokens is None or (len(layout[-1]) + 1) * width <= max_tokens:
                layout[-1].append(row)
                longest_prompt, longest_response = max(longest_prompt, prompt), max(longest_response, response)
                continue
        layout.append([row])
        longest_prompt, longest_response = prompt, response
    while len(layout) < at_least and any(len(rows) > 1 for rows in layout):
        widest = max(range(len(layout)), key=lambda i: (len(layout[i]), -i))
        rows = layout[widest]
        layout[widest : widest + 1] = [rows[: len(rows) // 2], rows[len(rows) // 2 :]]
    return layout


def pack_rollout(prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], pad_id: int) -> Rollout:
    """Left-pad prompts and right-pad responses into one rectangular batch."""
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    prompt_width = max(len(p) for p in prompts)
    response_width = max(1, max(len(r) for r in responses))
    n = len(prompts)
    input_ids = torch.full((n, prompt_width + response_width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    response_mask = torch.zeros((n, response_width), dtype=torch.long)
    for row, (prompt, response) in enumerate(zip(prompts, responses, strict=True)):
        start = prompt_width - len(prompt)
        input_ids[row, start:prompt_width] = torch.as_tensor(prompt, dtype=torch.long)
        input_ids[row, prompt_width : prompt_width + len(response)] = torch.as_tensor(response, dtype=torch.long)
        attention_mask[row, start : prompt_width + len(response)] = 1
        response_mask[row, : len(response)] = 1
    return Rollout(input_ids, attention_mask, response_mask, prompt_width)


def position_ids(attention_mask: Tensor) -> Tensor:
    """Positions counted over real tokens only (left padding does not shift them)."""
    return (attention_mask.cumsum(dim=-1) - 1).clamp(min=0)  # [N, T]


def response_log_probs(
    model,
    rollout: Rollout,
    temperature: float = 1.0,
    with_entropy: bool = False,
    chunk_size: int | None = None,
    shared_prompts: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """Log-probabilities (and optionally entropies) of the response tokens under `model`.

    Logits are divided by the sampling temperature, so the probabilities are those of the distribution
    the responses were drawn from.  Only the logits that predict response tokens are materialised: all of
    them at once, or with `chunk_size` those of that many response tokens at a time
    (`chunked_logprobs.py`: same values, far less memory at a large vocabulary).
    With `shared_prompts` the rows that share a prompt run it once (`shared_prompts.py`; same values).
    Returns ([N, R], [N, R] or None); values at padded positions are meaningless and must be masked.
    """
    if shared_prompts:
        return shared_prompt_log_probs(model, rollout, temperature, with_entropy, chunk_size)
    if chunk_size is not None:
        positions = position_ids(rollout.attention_mask)
        return chunked_response_log_probs(model, rollout, positions, temperature, with_entropy, chunk_size)
    response_width = rollout.response_mask.shape[1]
    output = model(
        input_ids=rollout.input_ids,
        attention_mask=rollout.attention_mask,
        position_ids=position_ids(rollout.attention_mask),
        use_cache=False,
        logits_to_keep=response_width + 1,
    )
    logits = output.logits[:, :-1, :]  # [N, R, V]: column j predicts response token j
    if temperature != 1.0:
        logits = logits / temperature
    labels = rollout.input_ids[:, rollout.prompt_width :]  # [N, R]
    logp = token_log_probs(logits, labels)
    entropy = token_entropy(logits) if with_entropy else None
    return logp, entropy
