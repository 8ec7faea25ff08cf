"""Fast sampling for GRPO: generate from a bf16 copy of the policy with the current LoRA merged in.

Hugging Face `generate` on a 4-bit model dequantises every weight at every decoded token and runs the
LoRA branch as extra matmuls; at Qwen2.5-3B scale that made generation ~90% of a GRPO step. This
sampler keeps one plain bf16 model of the same architecture whose linear weights are
`dequant(W_4bit) + scale * B @ A`, rewritten from the live policy by `sync()` after each optimizer
step. Only sampling uses it: the log-probabilities in the loss still come from the trained policy, so
what is learned does not change; the sampling distribution matches the policy's within bf16 rounding
(tests compare the logits).

`release()` frees the merged weights of the LoRA-wrapped linears (nearly all of the copy) between sampling and
the next `sync()`, which rebuilds them anyway: the loss passes can then use that memory. Embeddings, norms and
the head stay.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import AutoModelForCausalLM


def _dense_weight(layer: nn.Module) -> torch.Tensor:
    """The full-precision weight of a plain or bitsandbytes 4-bit linear layer."""
    weight = layer.weight
    quant_state = getattr(weight, "quant_state", None)
    if quant_state is None:
        return weight.data
    import bitsandbytes.functional as bnbf

    return bnbf.dequantize_4bit(weight.data, quant_state)


def _lora_layers(policy) -> dict[str, nn.Module]:
    """Name (relative to the wrapped transformers model) -> peft LoRA layer."""
    from peft.tuners.lora import LoraLayer

    inner = policy.base_model.model
    return {name: module for name, module in inner.named_modules() if isinstance(module, LoraLayer)}


class MergedSampler:
    def __init__(self, policy, dtype: torch.dtype = torch.bfloat16, adapter_name: str = "default"):
        self.policy = policy
        self.adapter_name = adapter_name
        self.dtype = dtype
        inner = policy.base_model.model
        device = next(policy.parameters()).device
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(inner.config, dtype=dtype)
        model = model.to_empty(device=device).eval().requires_grad_(False)
        self.lora_layers = _lora_layers(policy)
        self._copy_frozen_weights(inner, model)
        model.tie_weights()
        model.generation_config.pad_token_id = inner.generation_config.pad_token_id
        self.model = model
        self._shapes = {name: tuple(model.get_submodule(name).weight.shape) for name in self.lora_layers}
        self.released = False
        self.sync()

    @torch.no_grad()
    def _copy_frozen_weights(self, inner: nn.Module, model: nn.Module) -> None:
        """Everything outside the LoRA-wrapped layers: embeddings, norms, head, unwrapped linears."""
        for name, module in model.named_modules():
            if name in self.lora_layers:
                continue
            source = inner.get_submodule(name)
            for param_name, param in module.named_parameters(recurse=False):
                value = _dense_weight(source) if param_name == "weight" and isinstance(module, nn.Linear) else None
                if value is None:
                    value = getattr(source, param_name).data
                param.copy_(value.to(self.dtype))
            for buffer_name, buffer in module.named_buffers(recurse=False):
                buffer.copy_(getattr(source, buffer_name))

    @torch.no_grad()
    def release(self) -> None:
        """Free the merged weights of the LoRA-wrapped linears until the next `sync()` (which must come before
        the copy samples again)."""
        for name in self.lora_layers:
            weight = self.model.get_submodule(name).weight
            weight.data = torch.empty(0, dtype=weight.dtype, device=weight.device)
        self.released = True

    @torch.no_grad()
    def sync(self) -> None:
        """Rewrite every LoRA-wrapped linear as base + current delta (call after each optimizer step)."""
        for name, layer in self.lora_layers.items():
            target = self.model.get_submodule(name)
            if self.released:
                target.weight.data = torch.empty(self._shapes[name], dtype=self.dtype, device=target.weight.device)
            merged = _dense_weight(layer.base_layer).float()
            if self.adapter_name in layer.lora_A and not layer.disable_adapters:
                merged += layer.get_delta_weight(self.adapter_name).float()
            target.weight.copy_(merged.to(self.dtype))
            if layer.base_layer.bias is not None:
                target.bias.copy_(layer.base_layer.bias.to(self.dtype))
        self.released = False
