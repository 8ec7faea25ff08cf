"""Config entries that name what to build with `_target_`: the class or factory named, the arguments it takes, the
check of an entry's keys and the build with `hydra.utils.instantiate`.

An entry's keys other than `_target_` are arguments of what it names. What the run supplies (a folder, a tokenizer,
a data config, ...) is passed at build time to a target that takes it, so an entry cannot set it: such a key stops
with the setting a user changes instead, any other unknown key with the valid ones (ConfigError, in pre-flight).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Mapping

from hydra.utils import get_object, instantiate
from omegaconf import DictConfig, OmegaConf

from cqr_lightning.errors import ConfigError


def target_of(where: str, entry, what: str = "the class to build") -> Callable:
    """What `entry._target_` names; ConfigError when it is missing (asking for `what`) or cannot be imported."""
    target = entry.get("_target_") if entry is not None else None
    if not target:
        raise ConfigError(f"{where}._target_ is not set: name {what}")
    try:
        return get_object(str(target))
    except Exception as error:  # hydra wraps import errors in its own types
        raise ConfigError(f"{where}._target_={target} cannot be imported: {error}") from error


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


def target_arguments(target: Callable) -> set[str]:
    """The keyword arguments a class (its constructor) or a factory function takes."""
    if inspect.isclass(target):
        return constructor_arguments(target)
    parameters = inspect.signature(target).parameters.values()
    return {p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def qualified_name(target: Callable) -> str:
    return f"{target.__module__}.{target.__qualname__}"


def check_entry(where: str, entry, run_arguments: Mapping[str, str], own_keys: Iterable[str] = ()) -> Callable:
    """What the entry names, after checking its keys: ConfigError naming the first one that is set by the run
    (`run_arguments`: argument -> the setting to use instead) or is no argument of the target (nor in `own_keys`,
    keys that other code reads)."""
    target = target_of(where, entry)
    own = set(own_keys)
    accepted = target_arguments(target) - set(run_arguments)
    for key in map(str, entry):
        if key == "_target_" or key in own or key in accepted:
            continue
        if key in run_arguments:
            raise ConfigError(f"{where}.{key} is set by the run, not by the config: use {run_arguments[key]}")
        valid = ", ".join(sorted(own | accepted))
        raise ConfigError(
            f"{where}.{key} is not a setting: not an argument of {qualified_name(target)} ({where}._target_); "
            f"valid keys: {valid or 'none'}"
        )
    return target


def build_entry(where: str, entry: DictConfig, run_arguments: Mapping[str, str], own_keys: Iterable[str] = (), **run):
    """The entry's target built with `hydra.utils.instantiate` from its keys (but `own_keys`) and those of the run's
    arguments `run` that it takes; the run's arguments pass as they are (a DictConfig stays one)."""
    target = check_entry(where, entry, run_arguments, own_keys)
    own = set(own_keys)
    values = OmegaConf.to_container(entry, resolve=True)
    settings = {key: value for key, value in values.items() if key not in own}
    factory = instantiate(settings, _partial_=True, _convert_="all")
    accepted = target_arguments(target)
    return factory(**{key: value for key, value in run.items() if key in accepted})
