"""`python -m cqr_lightning.export`: the LoRA merged into its base, saved as a plain Hugging Face folder."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from cqr_lightning.errors import ConfigError
from cqr_lightning.export import export_rewriter
from cqr_lightning.readers import read_jsonl_turns
from cqr_lightning.rewriter_card import read_card

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_exported_model_rewrites_as_the_adapter_does(fixture_data_dir, tmp_path, rewriter_saver):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cqr_lightning.rewriters import ModelRewriter

    # float32 throughout: in bf16, merging rounds W + BA once, which can flip a near-tie of the random tiny model
    adapter, policy, tokenizer = rewriter_saver(tmp_path / "adapter", compute_dtype="float32")
    exported = tmp_path / "exported"
    command = [
        sys.executable, "-m", "cqr_lightning.export", f"model.adapter={adapter}", f"output_dir={exported}",
        "dtype=float32",
    ]  # fmt: skip
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert not any(p.name.startswith("adapter_") for p in exported.iterdir())  # one model, no peft files
    config = json.loads((exported / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "float32"
    card = read_card(exported)
    assert card["prompt"]["response_format"] == "rewrite_only" and card["merged_from"]["name_or_path"] == "tiny"

    model = AutoModelForCausalLM.from_pretrained(exported)
    turns = list(read_jsonl_turns(fixture_data_dir / "dev.jsonl"))

    def responses(model, tokenizer) -> list[str]:
        rewriter = ModelRewriter(model, tokenizer, 200, max_new_tokens=8, response_format="rewrite_only")
        return [r.response for r in rewriter(turns)]

    expected = responses(policy, tokenizer)
    assert responses(model, AutoTokenizer.from_pretrained(exported, padding_side="left")) == expected

    # the rewrite command on the exported folder asks it as the card says (format, budgets, search plan)
    output = tmp_path / "rewrites.jsonl"
    command = [
        sys.executable, "-m", "cqr_lightning.rewrite", f"model.name_or_path={exported}",
        f"input={fixture_data_dir / 'dev.jsonl'}", f"output={output}", f"output_dir={tmp_path / 'run'}",
    ]  # fmt: skip
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert [json.loads(line)["response"] for line in output.read_text().splitlines()] == expected


@pytest.mark.slow
def test_a_4bit_adapter_exports_dequantized_weights_plus_its_delta(tmp_path, monkeypatch, tiny_model_cfg):
    import torch
    from transformers import AutoModelForCausalLM

    from cqr_lightning.models.loading import load_policy, save_adapter

    monkeypatch.setenv("CQR_CACHE_DIR", str(tmp_path / "cache"))
    model_cfg = OmegaConf.merge(tiny_model_cfg, {"compute_dtype": "float32"})  # 4-bit NF4 base, float32 compute
    policy = load_policy(model_cfg, trainable=False)
    with torch.no_grad():
        for name, weight in policy.named_parameters():
            if "lora_B" in name:
                weight.normal_(std=0.5, generator=torch.Generator().manual_seed(1))
    adapter = save_adapter(policy, tmp_path / "adapter")  # an adapter saved without a card: the config decides
    cfg = OmegaConf.create({"model": {**model_cfg, "adapter": str(adapter)}, "output_dir": "", "dtype": "float32"})
    cfg.output_dir = str(tmp_path / "exported")
    export_rewriter(cfg)
    assert not (tmp_path / "exported" / "cqr_rewriter.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "exported")
    assert "quantization_config" not in json.loads((tmp_path / "exported" / "config.json").read_text())
    ids = torch.tensor([[1, 5, 9, 14, 3, 7]])
    with torch.no_grad():
        assert torch.allclose(merged(ids).logits, policy(input_ids=ids).logits, atol=1e-3)
    with pytest.raises(ConfigError, match="exists and is not empty"):
        export_rewriter(cfg)
