"""A run folder remembers the settings it was started with, so a rerun never mixes two recipes silently.

`train.py` writes `<run_dir>/settings.yaml` on a run's first call. A later call on the same folder (to resume, or to
run the next stage) must ask for the same recipe: if a setting that shapes the trained model differs, it stops and
names the differing keys. Settings that only say where or how to report (logger, evaluation, trainer device, the
stage to run, resume) may change freely; a key the recorded file lacks (added by a newer version) is not a change.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from cqr_lightning.errors import ConfigError
from cqr_lightning.io_utils import atomic_file

SETTINGS_FILE = "settings.yaml"
RECIPE_KEYS = (
    "seed",
    "response_format",
    "train_max_query_words",
    "pipeline",
    "search",
    "data",
    "retriever",
    "model",
    "warmup",
    "rl",
)
FREE_KEYS = (
    "data.eval_split",  # which splits are reported does not change what is trained
    "data.val_split",
    # how the same computation is laid out in memory (what an out-of-memory error asks to lower before resuming):
    # same losses and gradients up to float summation order (tests/test_rl.py), or the same sampling recipe with the
    # generate calls cut differently
    "model.gradient_checkpointing",
    "rl.micro_batch_size",
    "rl.micro_batch_tokens",
    "rl.generation_batch_size",
    "rl.logprob_chunk_size",
    "rl.shared_prompt_passes",
    "rl.release_sampling_copy",
    "rl.static_decoding",
    "rl.static_prompt_bucket",
    "rl.static_cache_at_full_length",
    "rl.static_decoding_loop",
    "warmup.sampling_batch_size",
)
# how often to checkpoint, validate or log, and on how many turns, does not change the trained weights either
FREE_SUFFIXES = ("checkpoint_every_n_steps", "val_every_n_steps", "table_every_n_steps", "val_limit", "val_batch_size")


def recipe(cfg: DictConfig) -> dict:
    """The resolved settings that shape the trained model, as plain data."""
    resolved = OmegaConf.to_container(cfg, resolve=True)
    return {key: resolved[key] for key in RECIPE_KEYS if key in resolved}


def flatten(tree: dict, prefix: str = "") -> dict[str, object]:
    flat: dict[str, object] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def changed_settings(recorded: dict, current: dict) -> dict[str, tuple[object, object]]:
    """Keys whose current value differs from the recorded one: {key: (recorded, current)}."""
    old, new = flatten(recorded), flatten(current)
    return {
        key: (old[key], new.get(key))
        for key in sorted(old)
        if key not in FREE_KEYS
        and not key.endswith(FREE_SUFFIXES)
        and old[key] != new.get(key)
        and (key in new or old[key] is not None)
    }


def check_run_settings(cfg: DictConfig, run_dir: Path) -> None:
    """Record the recipe on a run folder's first call; on later calls stop if it changed."""
    path = run_dir / SETTINGS_FILE
    current = recipe(cfg)
    if not path.is_file():
        with atomic_file(path) as handle:
            handle.write(OmegaConf.to_yaml(OmegaConf.create(current)))
        return
    recorded = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    changes = changed_settings(recorded, current)
    if changes:
        listed = "; ".join(f"{key}: {old!r} -> {new!r}" for key, (old, new) in list(changes.items())[:8])
        more = f" (and {len(changes) - 8} more)" if len(changes) > 8 else ""
        raise ConfigError(
            f"run_dir={run_dir} was started with other settings: {listed}{more}. To continue that run, repeat its "
            f"settings (recorded in {path}); to train with the new ones, choose another run_dir"
        )
