"""Pre-flight checks: every setting and every input file a command will use, before any model loads.

A run that would stop an hour in on a bad line of the evaluation split, or spin forever on an empty training
split, stops at once instead, with the file and line (`DataError`) or the setting (`ConfigError`) to fix. The
checks read the files through the same readers as training and evaluation do, so they see the same problems.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from numbers import Real
from pathlib import Path

from cqr_lightning.errors import ConfigError, DataError
from cqr_lightning.holdout import HOLDOUT_SPLITS, holdout_shares
from cqr_lightning.readers import iter_jsonl_objects, split_path, turn_reader, validation_split

log = logging.getLogger(__name__)

# settings that must be positive numbers, per config group
POSITIVE_SETTINGS = {
    "warmup": ("batch_size", "sampling_batch_size", "val_batch_size", "num_samples", "epochs", "lr"),
    "rl": ("batch_size", "micro_batch_size", "val_batch_size", "max_steps", "lr"),
    "rewriter": ("batch_size",),
}


def check_settings(cfg, groups: Iterable[str]) -> None:
    """ConfigError naming the first setting of `groups` that cannot work (a size or rate <= 0, G < 2), or that a
    stage group, its data modules or its callbacks do not take (cqr_lightning/builders.py, observers.py)."""
    from cqr_lightning.builders import RECIPE_KEYS, check_datamodule_settings, check_module_settings
    from cqr_lightning.observers import check_callback_settings

    for group in groups:
        section = cfg.get(group) or {}
        for name in POSITIVE_SETTINGS.get(group, ()):
            value = section.get(name)
            if value is None and group == "rewriter":
                continue
            if isinstance(value, bool) or not isinstance(value, Real) or value <= 0:
                raise ConfigError(f"{group}.{name}={value} must be a positive number")
        for name in ("generation_batch_size", "micro_batch_tokens") if group == "rl" else ():
            value = section.get(name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
                raise ConfigError(f"rl.{name}={value} must be a positive integer or null")
        if group == "rl" and not (isinstance(section.get("group_size"), int) and section.get("group_size") >= 2):
            raise ConfigError(
                f"rl.group_size={section.get('group_size')} must be at least 2: GRPO's advantage compares each "
                "response with the others sampled for the same prompt"
            )
        if group in RECIPE_KEYS:
            check_module_settings(cfg, group)
            check_datamodule_settings(cfg, group)
            check_callback_settings(cfg, group)


def corpus_ids(data_cfg) -> frozenset[str]:
    """The passage ids of `data.corpus`, every line checked; DataError when it holds none."""
    from data_modules.conversations import read_corpus_ids

    if not data_cfg.get("corpus"):
        raise ConfigError("data.corpus is not set: name the JSONL passage collection")
    if not Path(data_cfg.corpus).is_file():
        raise DataError(
            data_cfg.corpus, "corpus file not found: set data.dir=FOLDER (holding corpus.jsonl) or data.corpus"
        )
    ids = read_corpus_ids(data_cfg.corpus)
    if not ids:
        raise DataError(data_cfg.corpus, "the corpus holds no passage (data.corpus)")
    return ids


def check_split(data_cfg, split: str, known_ids=None, asked_by: str | None = None) -> int:
    """Read every turn of a split; DataError naming the file (and line) of the first problem: a missing file (and
    `asked_by`, the setting that asks for the split), unreadable or malformed lines, missing fields, positives absent
    from the corpus, a repeated turn id, no turn at all. Returns the number of turns."""
    path = split_path(data_cfg, data_cfg.train_split if split in HOLDOUT_SPLITS else split)
    if asked_by and not path.is_file():
        raise DataError(
            path, f"file not found: {asked_by} asks for split '{split}' (add the file or change {asked_by})"
        )
    seen: set[str] = set()
    for turn in turn_reader(data_cfg, split, known_ids)():
        if turn.id in seen:
            lines = jsonl_lines_of(path, turn.id) if data_cfg.format == "jsonl" else []
            where = f" (lines {', '.join(map(str, lines))})" if lines else ""
            raise DataError(path, f"turn id '{turn.id}' appears more than once{where}", lines[-1] if lines else None)
        seen.add(turn.id)
    if not seen:
        held_out = " (after data.holdout's share)" if any(holdout_shares(data_cfg)) else ""
        raise DataError(path, f"split '{split}' holds no turn{held_out}: nothing to train or evaluate on")
    return len(seen)


def jsonl_lines_of(path, turn_id: str) -> list[int]:
    """The lines of a JSONL turn file whose `id` is `turn_id`."""
    return [line for line, obj in iter_jsonl_objects(path) if str(obj.get("id")) == turn_id]


def check_inputs(cfg, splits: Mapping[str, str], groups: Iterable[str]) -> None:
    """The settings of `groups`, the corpus, then every split of `splits` (split -> the setting asking for it)."""
    check_settings(cfg, groups)
    ids = corpus_ids(cfg.data)
    known = ids if cfg.data.get("check_positives", True) else None
    counts = {split: check_split(cfg.data, split, known, asked_by) for split, asked_by in splits.items()}
    log.info("pre-flight: %d passages; turns per split %s", len(ids), counts)


def evaluation_splits(cfg) -> list[str]:
    """The splits the pipeline's final table reports: `eval.splits`, else `data.eval_split`."""
    return [str(split) for split in (cfg.eval.get("splits") or [cfg.data.eval_split])]


def training_splits(cfg) -> dict[str, str]:
    """What a training command reads, each split with the setting that first asks for it: the training split, the
    validation split and, for the pipeline, the splits of the final table."""
    splits = {str(cfg.data.train_split): "data.train_split"}
    splits.setdefault(validation_split(cfg.data), "data.val_split" if cfg.data.get("val_split") else "data.eval_split")
    if cfg.get("stage", "pipeline") == "pipeline":
        for split in evaluation_splits(cfg):
            splits.setdefault(split, "eval.splits" if cfg.eval.get("splits") else "data.eval_split")
    return splits


def training_groups(cfg) -> list[str]:
    stage = cfg.get("stage", "pipeline")
    if stage == "pipeline":
        return ["warmup", "rl"] if cfg.pipeline.warmup else ["rl"]
    return [stage]


def check_training_inputs(cfg) -> None:
    """Pre-flight of `train.py`: the stage's, the Trainer's and the logger's settings, the corpus and every split it
    will read."""
    from cqr_lightning.observers import check_logger_settings
    from cqr_lightning.trainer_flags import check_trainer_settings

    check_trainer_settings(cfg)
    check_logger_settings(cfg)
    check_inputs(cfg, training_splits(cfg), training_groups(cfg))


def check_evaluation_inputs(cfg) -> None:
    """Pre-flight of an evaluation: the rewriter's batch size, the tracking server, the corpus and the evaluated
    split."""
    if cfg.get("logger") is not None and cfg.logger.get("enabled"):
        from cqr_lightning.tracking import check_tracking_server

        check_tracking_server(cfg.logger)
    check_inputs(cfg, {str(cfg.data.eval_split): "data.eval_split"}, ["rewriter"])
