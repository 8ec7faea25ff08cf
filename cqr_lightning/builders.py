"""The training stages' LightningModules, built from their config groups with `hydra.utils.instantiate`.

A key of `conf/rl/*.yaml` (or `conf/warmup/*.yaml`) is a constructor argument of the group's `_target_`, with its
default in that file alone, except the stage's own recipe keys listed in `RECIPE_KEYS`, which `stages.py` reads
itself (batch sizes, steps, validation and checkpoint intervals, rewards, ...). The arguments that come from the
run rather than from the group (the policy, its tokenizer, the scorer, the seed, the prompt length, the response
format) are passed here, so the group cannot set them. A key that is none of these stops with a ConfigError
naming it, before any model loads (cqr_lightning/preflight.py). The warm-up's self-distillation sampler takes its
own `warmup` keys (`SAMPLER_KEYS`).

A stage's LightningDataModule is built the same way from the group's `datamodule` entry (and the warm-up's sampling
one from `warmup.sampling_datamodule`): its keys are constructor arguments, and the stage passes what it reads
from its recipe and the run (`DATA_RUN_ARGUMENTS`): the `data` config, batch sizes, limits, the turns to skip.
"""

from __future__ import annotations

from functools import partial

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from cqr_lightning.errors import ConfigError
from cqr_lightning.targets import build_entry, check_entry, constructor_arguments, target_of

# keys of a stage group that the stage's recipe (stages.py) reads; every other key is a constructor argument
RECIPE_KEYS = {
    "rl": (
        "batch_size",
        "max_steps",
        "rewards",
        "skip_turns_solved_at_rank",
        "val_limit",
        "val_every_n_steps",
        "checkpoint_every_n_steps",
        "table_every_n_steps",
        "datamodule",
    ),
    "warmup": (
        "num_samples",
        "temperature",
        "top_p",
        "prefill_response",
        "lenient_format",
        "keep_rank",
        "solved_turn_target",
        "sample_limit",
        "sampling_batch_size",
        "reuse_distilled",
        "epochs",
        "batch_size",
        "accumulate_grad_batches",
        "warmup_ratio",
        "gradient_clip_val",
        "val_limit",
        "val_every_n_steps",
        "validate_before",
        "checkpoint_every_n_steps",
        "sampling_datamodule",
        "datamodule",
    ),
}
# warm-up keys that are arguments of the self-distillation sampler (cqr_lightning/distill.py), not of the module
SAMPLER_KEYS = ("num_samples", "temperature", "top_p", "max_new_tokens", "prefill_response")
# constructor arguments the run supplies, and the setting a user changes instead
RUN_ARGUMENTS = {
    "policy": "model",
    "tokenizer": "model",
    "scorer": "retriever, search and rl.rewards",
    "seed": "seed",
    "max_prompt_length": "model.max_prompt_length",
    "response_format": "response_format",
}
# constructor arguments a stage computes from its recipe keys
STAGE_ARGUMENTS = {"warmup": {"warmup_steps": "warmup.warmup_ratio", "total_steps": "warmup.epochs"}}


def module_class(group: str, group_cfg: DictConfig) -> type:
    """The class named by the group's `_target_`; ConfigError when it is missing or cannot be imported."""
    return target_of(group, group_cfg, f"the LightningModule to build (conf/{group}/default.yaml)")


def check_module_settings(cfg: DictConfig, group: str) -> None:
    """ConfigError naming the first key of `group` that is neither a recipe key nor a constructor argument that the
    group may set."""
    group_cfg = cfg[group]
    cls = module_class(group, group_cfg)
    stage_arguments = STAGE_ARGUMENTS.get(group, {})
    accepted = constructor_arguments(cls) - set(RUN_ARGUMENTS) - set(stage_arguments)
    for key in group_cfg:
        key = str(key)
        if key == "_target_" or key in RECIPE_KEYS[group] or key in accepted:
            continue
        if key in RUN_ARGUMENTS or key in stage_arguments:
            instead = RUN_ARGUMENTS.get(key) or stage_arguments[key]
            raise ConfigError(f"{group}.{key} is set by the run, not by the {group} group: use {instead}")
        valid = ", ".join(sorted({*RECIPE_KEYS[group], *accepted}))
        raise ConfigError(
            f"{group}.{key} is not a setting: neither a key of the {group} stage nor an argument of "
            f"{cls.__module__}.{cls.__qualname__} ({group}._target_); valid keys: {valid}"
        )


def build_module(cfg: DictConfig, group: str, policy, tokenizer, scorer, target: type | None = None, **stage_arguments):
    """The group's `_target_` (or `target`, a subclass a benchmark wraps it in) built from the group's constructor
    keys, the run's arguments from `cfg` (those the class takes) and the arguments the stage computed."""
    check_module_settings(cfg, group)
    cls = target or module_class(group, cfg[group])
    values = OmegaConf.to_container(cfg[group], resolve=True)
    settings = {key: value for key, value in values.items() if key != "_target_" and key not in RECIPE_KEYS[group]}
    run = {
        "scorer": scorer,
        "seed": int(cfg.seed),
        "max_prompt_length": cfg.model.max_prompt_length,
        "response_format": cfg.response_format,
    }
    accepted = constructor_arguments(cls)
    if target is None:
        factory = instantiate({"_target_": cfg[group]._target_, **settings}, _partial_=True, _convert_="all")
    else:  # a class Hydra cannot import by name (defined in a script or a function)
        factory = partial(target, **settings)
    return factory(policy, tokenizer, **{k: v for k, v in run.items() if k in accepted}, **stage_arguments)


def build_sampler(cfg: DictConfig, policy, tokenizer):
    """The warm-up's self-distillation sampler, from the `warmup` keys it takes (`SAMPLER_KEYS`) and the run's."""
    from cqr_lightning.distill import RewriteSampler

    return RewriteSampler(
        policy,
        tokenizer,
        max_prompt_length=cfg.model.max_prompt_length,
        response_format=cfg.response_format,
        seed=int(cfg.seed),
        **{key: cfg.warmup[key] for key in SAMPLER_KEYS},
    )


# data module arguments the stage passes, and the setting a user changes instead
DATA_RUN_ARGUMENTS = {
    "data_cfg": "the data group (data=..., data.<key>=...)",
    "distilled_path": "the warm-up's distilled file (<run_dir>/warmup/distilled.jsonl)",
    "batch_size": "the stage's batch_size",
    "eval_batch_size": "the stage's val_batch_size (warmup.sampling_batch_size when sampling)",
    "train_limit": "warmup.sample_limit",
    "val_limit": "the stage's val_limit",
    "skip_train_ids": "rl.skip_turns_solved_at_rank and search.first_turn_as_asked",
}
DATAMODULE_KEYS = {"rl": ("datamodule",), "warmup": ("sampling_datamodule", "datamodule")}


def check_datamodule_settings(cfg: DictConfig, group: str) -> None:
    """ConfigError naming the first key of the group's data module entries that their `_target_` does not take."""
    for key in DATAMODULE_KEYS.get(group, ()):
        check_entry(f"{group}.{key}", cfg[group].get(key), DATA_RUN_ARGUMENTS)


def build_datamodule(cfg: DictConfig, group: str, key: str = "datamodule", **run_arguments):
    """The data module of `<group>.<key>`, given `cfg.data` and the stage's `run_arguments` (those it takes)."""
    return build_entry(f"{group}.{key}", cfg[group].get(key), DATA_RUN_ARGUMENTS, data_cfg=cfg.data, **run_arguments)
