"""A device out-of-memory error turned into one that names the phase and the settings that lower its memory.

torch's own message says how much it tried to allocate and how much was free, but not which of a stage's knobs
would have made it fit; a user on a 24 GB card needs the latter. The first line of torch's message is kept, and the
original error stays chained (`HYDRA_FULL_ERROR=1` shows its traceback).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch

from cqr_lightning.errors import ConfigError, first_line


class OutOfDeviceMemory(ConfigError):
    """The device ran out of memory; the message names the phase and the settings to lower."""


def out_of_memory_message(stage: str, phase: str, cause: BaseException, hints: Sequence[str]) -> str:
    detail = first_line(cause, "out of memory")
    lines = [f"{stage}: the device ran out of memory during {phase} ({detail})", "to fit, lower one of:"]
    lines += [f"  {hint}" for hint in hints]
    return "\n".join(lines)


@contextmanager
def out_of_memory_named(stage: str, phase: str, hints: Callable[[], Sequence[str]]) -> Iterator[None]:
    """Run the block; a torch.OutOfMemoryError inside it becomes OutOfDeviceMemory listing `hints()`."""
    try:
        yield
    except torch.OutOfMemoryError as error:
        raise OutOfDeviceMemory(out_of_memory_message(stage, phase, error, hints())) from error


def checkpointing_on(policy) -> bool:
    """Whether the policy's base model recomputes activations in backward (transformers' flag, read under the name
    this transformers has; 5.23 renamed it)."""
    model = policy.get_base_model() if hasattr(policy, "get_base_model") else policy
    for name in ("is_activation_checkpointing", "is_gradient_checkpointing"):
        if hasattr(type(model), name):
            return bool(getattr(model, name))
    return False


def loss_pass_hints(micro_batch_setting: str, micro_batch: int, backward: bool, checkpointing: bool) -> list[str]:
    """What lowers the memory of a pass over a micro-batch: fewer sequences, recomputed activations (when it
    backpropagates), shorter prompts."""
    hints = [f"{micro_batch_setting}={micro_batch} (sequences a pass holds at once; e.g. {max(1, micro_batch // 2)})"]
    if backward and not checkpointing:
        hints.append("model.gradient_checkpointing=true (recompute activations in backward)")
    hints.append("model.max_prompt_length (history tokens kept per prompt)")
    return hints
