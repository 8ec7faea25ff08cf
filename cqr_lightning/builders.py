"""The training stages' LightningModules, built from their config groups with `hydra.utils.instantiate`.

A key of `conf/rl/*.yaml` (or `conf/warmup/*.yaml`) is a constructor argument of the group's `_target_`, with its
default in that file alone, except the stage's own recipe keys listed in `RECIPE_KEYS`, which `stages.py` reads
itself (batch sizes, steps, validation and checkpoint intervals, rewards, ...). The arguments that come from the
run rather than from the group (the policy, its tokenizer, the scorer, the seed, the prompt length, the response
format) are passed here, so the group cannot set them. A key that is none of these stops with a ConfigError
naming it, before any model loads (cqr_lightning/preflight.py). The warm-up's self-distillation sampler takes its
own `warmup` keys (`SAMPLER_KEYS`).
"""

from __future__ import annotations

import inspect
from functools import partial

from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf

from cqr_lightning.errors import ConfigError

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
    ),
    "warmup": (
        "num_samples",
        "temperature",
        "top_p",
        "prefill_response",
        "lenient_format",
        "keep_rank",
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
    target = group_cfg.get("_target_")
    if not target:
        raise ConfigError(f"{group}._target_ is not set: name the LightningModule to build (conf/{group}/default.yaml)")
    try:
        return get_class(str(target))
    except Exception as error:  # hydra wraps import errors in its own types
        raise ConfigError(f"{group}._target_={target} cannot be imported: {error}") from error


def constructor_arguments(cls: type) -> set[str]:
    """The keyword arguments `cls` takes, following `**kwargs` up to its base classes' constructors."""
    names: set[str] = set()
    for klass in cls.__mro__:
        if "__init__" not in vars(klass):
            continue
        parameters = inspect.signature(klass.__init__).parameters.values()
        names |= {p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)} - {"self"}
        if not any(p.kind == p.VAR_KEYWORD for p in parameters):
            break
    return names


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
