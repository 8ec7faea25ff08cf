"""A device out-of-memory error names the phase and the settings that lower its memory (unit level; the stages'
use of it is tested in test_rl.py and test_warmup.py)."""

from __future__ import annotations

import pytest
import torch

from cqr_lightning.errors import ConfigError, user_error
from cqr_lightning.memory_errors import (
    OutOfDeviceMemory,
    checkpointing_on,
    loss_pass_hints,
    out_of_memory_named,
)

TORCH_MESSAGE = "CUDA out of memory. Tried to allocate 656.00 MiB. GPU 0 has a total capacity of 139.80 GiB\nmore"


def fail_for_memory(model, method: str, when=lambda: True) -> None:
    """Make `model.<method>` raise CUDA's out-of-memory error (which a CPU cannot raise itself) while `when()`."""
    original = getattr(model, method)

    def failing(*args, **kwargs):
        if when():
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has 1.5 GiB free.")
        return original(*args, **kwargs)

    setattr(model, method, failing)


def out_of_memory_lines(call) -> list[str]:
    """The lines of the OutOfDeviceMemory that `call()` raises."""
    with pytest.raises(OutOfDeviceMemory) as caught:
        call()
    return str(caught.value).splitlines()


def test_an_out_of_memory_error_becomes_a_user_error_naming_phase_torch_detail_and_hints():
    with pytest.raises(OutOfDeviceMemory) as caught:
        with out_of_memory_named("rl", "forward_backward", lambda: ["rl.micro_batch_size=32", "other"]):
            raise torch.OutOfMemoryError(TORCH_MESSAGE)
    message = str(caught.value)
    assert message.startswith("rl: the device ran out of memory during forward_backward (CUDA out of memory. Tried")
    assert "more" not in message, "only the first line of torch's message"
    assert message.splitlines()[-2:] == ["  rl.micro_batch_size=32", "  other"]
    assert isinstance(caught.value.__cause__, torch.OutOfMemoryError)
    assert user_error(caught.value) is caught.value, "reported as a user's setting: message, exit code 2"
    assert isinstance(caught.value, ConfigError)


def test_other_errors_pass_through_and_hints_are_only_computed_on_failure():
    asked = []
    with pytest.raises(RuntimeError, match="not memory"):
        with out_of_memory_named("rl", "generation", lambda: asked.append(1) or []):
            raise RuntimeError("not memory")
    with out_of_memory_named("rl", "generation", lambda: asked.append(1) or []):
        pass
    assert asked == []


def test_loss_pass_hints_halve_the_micro_batch_and_offer_checkpointing_only_when_it_helps():
    hints = loss_pass_hints("rl.micro_batch_size", 32, backward=True, checkpointing=False)
    assert hints[0].startswith("rl.micro_batch_size=32 ") and "e.g. 16" in hints[0]
    assert "model.gradient_checkpointing=true" in hints[1]
    assert not any("checkpointing" in h for h in loss_pass_hints("rl.micro_batch_size", 1, True, checkpointing=True))
    assert not any("checkpointing" in h for h in loss_pass_hints("rl.micro_batch_size", 8, False, checkpointing=False))
    assert "e.g. 1)" in loss_pass_hints("rl.micro_batch_size", 1, True, True)[0]


def test_checkpointing_on_reads_the_flag_of_the_policys_base_model(tiny_model_cfg):
    from omegaconf import OmegaConf

    from cqr_lightning.models.loading import load_policy

    with_checkpoints = load_policy(OmegaConf.merge(tiny_model_cfg, {"gradient_checkpointing": True}))
    without = load_policy(OmegaConf.merge(tiny_model_cfg, {"gradient_checkpointing": False}))
    assert checkpointing_on(with_checkpoints) is True and checkpointing_on(without) is False


def test_running_out_of_memory_while_rewriting_names_the_rewriter_settings(tiny_model_cfg, data_cfg):
    from cqr_lightning.models.loading import load_policy, load_tokenizer
    from cqr_lightning.readers import read_jsonl_turns
    from cqr_lightning.rewriters import ModelRewriter

    model = load_policy(tiny_model_cfg, trainable=False)
    fail_for_memory(model, "generate")
    rewriter = ModelRewriter(model, load_tokenizer(tiny_model_cfg), max_prompt_length=1024, max_new_tokens=8)
    lines = out_of_memory_lines(lambda: rewriter(list(read_jsonl_turns(f"{data_cfg.dir}/dev.jsonl"))[:2]))
    assert lines[0].startswith("rewriter: the device ran out of memory during rewriting (CUDA out of memory.")
    assert lines[2:] == [
        "  rewriter.batch_size=8 (sequences a generate call holds; eval.rewriter.batch_size in train.py's tables)",
        "  rewriter.max_new_tokens=8",
        "  model.max_prompt_length=1024",
    ]
