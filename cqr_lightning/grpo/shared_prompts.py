"""Loss passes that run each prompt once for all the responses sampled from it (`rl.shared_prompt_passes`).

A GRPO step samples G responses per prompt, and the plain loss pass (`rollout.response_log_probs`) runs every
response with its own copy of the prompt: with the pack's prompts (~430 tokens) and 48-token responses, nine tokens
in ten that a pass computes are prompt tokens, computed G times over. Here the rows that share a prompt become one
packed row, the prompt once and then each response:

    prompt | response 1 | response 2 | ... | response k | padding

with an attention mask that lets a prompt token see the earlier prompt tokens, and a response token see the whole
prompt and the earlier tokens of its own response, nothing else; positions restart after the prompt for every
response, so each response sees exactly the positions and keys it saw when sampled. The logits that predict a
response come from the last hidden states at the positions before its tokens (for its first token, the prompt's
last position, shared by the group), put through the LM head as the chunked path does (`chunked_logprobs.py`), so
values equal the plain path's up to floating-point summation order, and gradients flow into the shared prompt from
every response of the group.

Rows are grouped by their prompt's token ids, so two rows share a prompt only when it is the same text. The mask is
a 4-D boolean tensor given to the model as a custom mask (transformers uses a 4-D mask as it is), which `sdpa` and
`eager` attention take; `flash_attention_2` cannot, and neither can models whose logits are not `lm_head(hidden)`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from cqr_lightning.grpo.chunked_logprobs import chunked_token_stats, decoder_and_head, head_token_stats

MASKED_ATTENTION = ("sdpa", "eager")


@dataclass
class SharedPromptLayout:
    """A rollout's rows packed by prompt. `predicting` [T] indexes the flattened [B * L] packed positions whose
    hidden states predict the real response tokens, in the rollout's row-major order of `response_mask`."""

    input_ids: Tensor  # [B, L]
    position_ids: Tensor  # [B, L]
    attention_mask: Tensor  # [B, 1, L, L] bool: query row, key column
    predicting: Tensor  # [T]

    @property
    def tokens(self) -> int:
        return self.input_ids.numel()


def segment_mask(segments: Tensor) -> Tensor:
    """[B, 1, L, L] bool from [B, L] segment ids (0: prompt, i > 0: response i, -1: padding): a query sees an earlier
    or the same key that is in the prompt or in its own response; a padding query sees only itself (no row of the
    softmax is empty)."""
    length = segments.shape[1]
    index = torch.arange(length, device=segments.device)
    causal = index[:, None] >= index[None, :]  # [L, L]
    query, key = segments[:, :, None], segments[:, None, :]  # [B, L, 1], [B, 1, L]
    visible = causal & ((key == 0) | (key == query)) & (query >= 0) & (key >= 0)
    visible |= torch.eye(length, dtype=torch.bool, device=segments.device)
    return visible.unsqueeze(1)


def shared_prompt_layout(rollout) -> SharedPromptLayout:
    """Pack `rollout`'s rows (a `Rollout`) so that rows with the same prompt share one packed row."""
    prompt_lengths = rollout.prompt_lengths().tolist()
    response_lengths = rollout.response_lengths().tolist()
    width = rollout.prompt_width
    ids = rollout.input_ids.tolist()
    groups: dict[tuple[int, ...], list[int]] = {}
    for row, length in enumerate(prompt_lengths):
        if length < 1:
            raise ValueError(f"rollout row {row} has an empty prompt; a shared-prompt pass needs at least one token")
        groups.setdefault(tuple(ids[row][width - length : width]), []).append(row)
    packed_ids, positions, segments = [], [], []
    predicting_of_row: dict[int, list[int]] = {}  # row -> packed offsets (within its packed row) predicting it
    packed_row_of: dict[int, int] = {}
    for packed, (prompt, rows) in enumerate(groups.items()):
        tokens, position, segment = list(prompt), list(range(len(prompt))), [0] * len(prompt)
        for number, row in enumerate(rows, start=1):
            response = ids[row][width : width + response_lengths[row]]
            start = len(tokens)
            # the first response token is predicted by the prompt's last position, each later one by the one before
            predicting_of_row[row] = (
                ([len(prompt) - 1] + list(range(start, start + len(response) - 1))) if response else []
            )
            packed_row_of[row] = packed
            tokens += response
            position += range(len(prompt), len(prompt) + len(response))
            segment += [number] * len(response)
        packed_ids.append(tokens)
        positions.append(position)
        segments.append(segment)
    length = max(len(tokens) for tokens in packed_ids)
    device = rollout.input_ids.device

    def padded(rows: list[list[int]], value: int) -> Tensor:
        return torch.tensor([r + [value] * (length - len(r)) for r in rows], dtype=torch.long, device=device)

    predicting = [
        packed_row_of[row] * length + offset for row in range(len(rollout)) for offset in predicting_of_row[row]
    ]
    return SharedPromptLayout(
        input_ids=padded(packed_ids, 0),
        position_ids=padded(positions, 0),
        attention_mask=segment_mask(padded(segments, -1)),
        predicting=torch.tensor(predicting, dtype=torch.long, device=device),
    )


def check_masked_attention(model) -> None:
    """Refuse attention implementations that ignore a custom 4-D mask, naming the setting."""
    implementation = getattr(model.config, "_attn_implementation", "sdpa")
    if implementation not in MASKED_ATTENTION:
        raise ValueError(
            f"rl.shared_prompt_passes needs attention that takes a custom mask ({' or '.join(MASKED_ATTENTION)}); "
            f"the policy uses {implementation!r}: set rl.shared_prompt_passes=false"
        )


def shared_prompt_log_probs(
    model, rollout, temperature: float = 1.0, with_entropy: bool = False, chunk_size: int | None = None
) -> tuple[Tensor, Tensor | None]:
    """[N, R] log-probs (and entropies) of `rollout`'s response tokens, each prompt run once
    (`shared_prompt_layout`); 0.0 at padded response positions, as `chunked_response_log_probs` gives."""
    check_masked_attention(model)
    decoder, head = decoder_and_head(model)
    layout = shared_prompt_layout(rollout)
    hidden = decoder(
        input_ids=layout.input_ids,
        attention_mask=layout.attention_mask,
        position_ids=layout.position_ids,
        use_cache=False,
    ).last_hidden_state  # [B, L, H]
    keep = rollout.response_mask.bool()  # [N, R]
    predicting = hidden.reshape(-1, hidden.shape[-1])[layout.predicting]  # [T, H]
    labels = rollout.input_ids[:, rollout.prompt_width :][keep]  # [T]
    if chunk_size is None:
        logp, entropy = head_token_stats(head, predicting, labels, temperature, with_entropy)
    else:
        logp, entropy = chunked_token_stats(head, predicting, labels, temperature, chunk_size, with_entropy)
    zeros = torch.zeros(keep.shape, dtype=logp.dtype, device=logp.device)
    return zeros.masked_scatter(keep, logp), (zeros.masked_scatter(keep, entropy) if with_entropy else None)
