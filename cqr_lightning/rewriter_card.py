"""`cqr_rewriter.json`: how an adapter was trained, saved beside its weights so that it can be used as trained.

The card records the base model (a portable id: the config's hub id, local folder, GGUF file or `tiny`, never a
cache path), the prompt (response format, no few-shot example, prompt and response budgets), the search plan
the rewriter was trained for and how it is asked by default (`inference`: rewrites per turn and their sampling
temperature, from the training config's `inference` block). Commands that load an adapter (`evaluate`, `rewrite`,
`export`) start from these values instead of their config defaults; any key the user set on the command line wins
(`command_line_keys`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from cqr_lightning.errors import ConfigError

log = logging.getLogger(__name__)

CARD_FILE = "cqr_rewriter.json"
CARD_VERSION = 1
BASE_MODEL_KEYS = ("name_or_path", "gguf_file", "tiny_seed", "load_in_4bit", "compute_dtype")
BASE_IDENTITY_KEYS = ("name_or_path", "gguf_file", "tiny_seed")  # which weights; quantization and dtype may differ
# card entry (section, key) -> the config key of evaluate/rewrite/export it sets
CONFIG_KEYS = {
    **{("base_model", key): f"model.{key}" for key in BASE_MODEL_KEYS},
    ("prompt", "response_format"): "rewriter.response_format",
    ("prompt", "few_shot"): "rewriter.few_shot",
    ("prompt", "max_prompt_length"): "model.max_prompt_length",
    ("prompt", "max_new_tokens"): "rewriter.max_new_tokens",
    ("search", "query_mode"): "search.query_mode",
    ("search", "first_turn_as_asked"): "search.first_turn_as_asked",
    ("search", "fusion_k"): "search.fusion_k",
    ("inference", "num_samples"): "rewriter.num_samples",
    ("inference", "temperature"): "rewriter.temperature",
}
# choosing these groups on the command line sets none of their keys: `rewriter=model` is how an adapter is used
GROUPS_THAT_SET_NO_KEYS = frozenset({"rewriter"})


def rewriter_card(cfg: DictConfig, max_new_tokens: int) -> dict[str, Any]:
    """The card of an adapter trained under the training config `cfg` with responses of `max_new_tokens`."""
    from cqr_lightning.rewriters import check_sampling
    from cqr_lightning.search import SearchPlan

    plan = SearchPlan.from_config(cfg.get("search"))
    inference = cfg.get("inference") or {}
    num_samples, temperature = int(inference.get("num_samples", 1)), float(inference.get("temperature", 1.0))
    check_sampling(num_samples, temperature, prefix="inference")
    return {
        "format_version": CARD_VERSION,
        "base_model": {key: _plain(cfg.model.get(key)) for key in BASE_MODEL_KEYS},
        "prompt": {
            "response_format": str(cfg.response_format),
            "few_shot": False,  # a trained rewriter is asked without the worked example
            "max_prompt_length": int(cfg.model.max_prompt_length),
            "max_new_tokens": int(max_new_tokens),
        },
        "search": {
            "query_mode": plan.query_mode,
            "first_turn_as_asked": plan.first_turn_as_asked,
            "fusion_k": plan.fusion_k,
        },
        "inference": {"num_samples": num_samples, "temperature": temperature},
    }


def _plain(value):
    return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value


def write_card(folder: str | Path, card: Mapping[str, Any]) -> Path:
    path = Path(folder) / CARD_FILE
    path.write_text(json.dumps(card, indent=2) + "\n", encoding="utf-8")
    return path


def read_card(folder: str | Path) -> dict[str, Any] | None:
    """The card saved with the adapter in `folder`; None for an adapter saved without one."""
    path = Path(folder) / CARD_FILE
    if not path.is_file():
        return None
    try:
        card = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ConfigError(f"model.adapter: {path} is not valid JSON ({err.msg})") from None
    if not isinstance(card, dict) or card.get("format_version") != CARD_VERSION:
        raise ConfigError(f"model.adapter: {path} is not a version-{CARD_VERSION} rewriter card")
    return card


def check_adapter_base(folder: str | Path, model_settings: Any) -> None:
    """Stop before any weight loads when the adapter at `folder` was trained on another base model than the one
    `model_settings` (the `model` group, any object with its keys as attributes) names: the LoRA would load
    without complaint on a base of the same shapes and rewrite nonsense. An adapter without a card is not checked."""
    card = read_card(folder)
    trained = card.get("base_model") if card else None
    if not isinstance(trained, Mapping):
        return
    differing = [
        key
        for key in BASE_IDENTITY_KEYS
        if key in trained and not _same_base_value(trained[key], getattr(model_settings, key, None))
    ]
    if differing:
        found = ", ".join(f"model.{key}={getattr(model_settings, key, None)!r}" for key in differing)
        wanted = ", ".join(f"model.{key}={trained[key]!r}" for key in differing)
        raise ConfigError(
            f"model.adapter={folder} was trained on another base model ({Path(folder) / CARD_FILE}): the config "
            f"has {found}, the adapter needs {wanted}; set those, or choose an adapter trained on this base"
        )


def _same_base_value(trained, current) -> bool:
    """Equal, or two spellings of one existing local path."""
    if trained == current:
        return True
    if isinstance(trained, str) and isinstance(current, str):
        first, second = Path(trained).expanduser(), Path(current).expanduser()
        return first.exists() and second.exists() and first.resolve() == second.resolve()
    return False


def card_settings(card: Mapping[str, Any]) -> dict[str, Any]:
    """The card as config keys: {'rewriter.response_format': 'rewrite_only', 'search.query_mode': ..., ...}."""
    return {
        config_key: card[section][key]
        for (section, key), config_key in CONFIG_KEYS.items()
        if isinstance(card.get(section), Mapping) and key in card[section]
    }


def command_line_keys(overrides: Iterable[str], groups: Iterable[str] = ()) -> frozenset[str]:
    """The config keys a Hydra command line sets: `a.b=1`, `+a.b=1`, `++a.b=1` and `~a.b` name `a.b`; choosing a
    config group (`model=tiny`, one of `groups`) sets all its keys, except the groups in GROUPS_THAT_SET_NO_KEYS."""
    groups = set(groups)
    keys = set()
    for override in overrides:
        key = override.split("=", 1)[0].lstrip("+~").strip()
        if key.startswith("hydra.") or (key in groups and key in GROUPS_THAT_SET_NO_KEYS):
            continue
        keys.add(key.split("@", 1)[0])  # `group@package=choice` chooses `group`
    return frozenset(keys)


def _is_set(key: str, explicit: frozenset[str]) -> bool:
    return any(key == given or key.startswith(f"{given}.") for given in explicit)


def apply_card(cfg: DictConfig, card: Mapping[str, Any], explicit: frozenset[str]) -> tuple[DictConfig, dict]:
    """A copy of `cfg` with the card's settings, except the keys in `explicit` (or under one of them); also returns
    the settings applied."""
    applied = {key: value for key, value in card_settings(card).items() if not _is_set(key, explicit)}
    updated = cfg.copy()
    for key, value in applied.items():
        OmegaConf.update(updated, key, value, force_add=True)
    return updated, applied


def card_folder(cfg: DictConfig) -> str | None:
    """The folder of the card to use: `model.adapter`, else an exported model (`model.name_or_path`) that has one."""
    model = cfg.get("model") or {}
    if model.get("adapter"):
        return str(model.adapter)
    name = model.get("name_or_path")
    return str(name) if name and (Path(str(name)) / CARD_FILE).is_file() else None


def with_adapter_card(cfg: DictConfig, explicit: frozenset[str]) -> DictConfig:
    """`cfg` with the settings recorded beside `model.adapter` (or in an exported model's folder), the user's keys
    kept; `cfg` itself when there is no card."""
    folder = card_folder(cfg)
    card = read_card(folder) if folder else None
    if card is None:
        if folder:
            log.warning("%s has no %s: using the command's settings as they are", folder, CARD_FILE)
        return cfg
    updated, applied = apply_card(cfg, card, explicit)
    log.info("settings from %s: %s", Path(folder) / CARD_FILE, applied)
    return updated


def hydra_command_line_keys() -> frozenset[str]:
    """`command_line_keys` of the running Hydra app (empty outside one)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return frozenset()
    hydra_cfg = HydraConfig.get()
    return command_line_keys(hydra_cfg.overrides.task, hydra_cfg.runtime.choices.keys())
