"""GRPO rewards as a weighted sum of terms (`rl.rewards` in conf/rl/default.yaml).

A term is a function of what the scorer knows about each response, all lists of the same length:

    term(rewrites, ranks, format_ok, turns, **context) -> list[float | None]

`rewrites[i]` is the rewrite read from response i (None when it has none), `ranks[i]` the best gold rank of the
search it was scored with (None when no gold passage is in the top 100, or when the response was malformed and not
searched), `format_ok[i]` the format check, `turns[i]` the turn (question, history, positives...). A term that
names `question_ranks` as a parameter also gets the best gold rank of each turn's question searched as asked (one
more search per new turn, made only when some term asks for it). A term that names `rankings` gets each
response's ranking (None for a malformed one), and `combine` the search plan's way of making one ranking of several
(as for a turn's several sampled rewrites at inference). None means "no opinion" and counts as 0 in the
sum. The reward is sum(weight * term). The default, a `rank_incentive` term and a
`format` term of weight 1, equals SPEC's reward exactly: the rank-incentive value of a well-formed response, -0.1
for a malformed one.

A new reward is one function with that signature plus one entry in `rl.rewards`: either a name registered in
`REWARD_TERMS` or the function's import path (`package.module:function`).
"""

from __future__ import annotations

import importlib
import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass

from cqr_lightning.errors import ConfigError
from cqr_lightning.formatting import is_copy
from cqr_lightning.grpo.rewards import FORMAT_FAILURE_REWARD, REWARD_FUNCTIONS, RewardFunction, rank_incentive_reward
from cqr_lightning.retrieval.base import best_gold_rank

RewardTerm = Callable[..., list[float | None]]  # (rewrites, ranks, format_ok, turns, **context)
TERM_CONTEXT = frozenset({"question_ranks", "rankings", "combine"})  # what a term may name beyond the lists


def rank_term(shape: RewardFunction) -> RewardTerm:
    """A term worth `shape(rank)` for each well-formed response and nothing for a malformed one."""

    def term(rewrites, ranks, format_ok, turns, **context) -> list[float | None]:
        return [shape(rank, True) if ok else None for rank, ok in zip(ranks, format_ok, strict=True)]

    term.__name__ = f"rank_term_{shape.__name__}"
    return term


def format_term(rewrites, ranks, format_ok, turns, **context) -> list[float | None]:
    """SPEC's format penalty: -0.1 for a response that fails the format check, 0 otherwise."""
    return [0.0 if ok else FORMAT_FAILURE_REWARD for ok in format_ok]


def below_question_term(rewrites, ranks, format_ok, turns, question_ranks, **context) -> list[float | None]:
    """How much rank-incentive reward a well-formed rewrite loses against the question searched as asked, as a
    non-positive value: -max(0, RIRS(question rank) - RIRS(rank)). With a positive weight it makes pushing a gold
    passage below where the question alone put it cost more than the same rank reached from a worse start."""
    return [
        -max(0.0, rank_incentive_reward(q, True) - rank_incentive_reward(r, True)) if ok else None
        for r, ok, q in zip(ranks, format_ok, question_ranks, strict=True)
    ]


def charge_changed_questions(rewrites, ranks, format_ok, turns, question_ranks, charged) -> list[float | None]:
    """None for a malformed response, 0 for a copy of the question, and for any other rewrite -1 where
    `charged(rank, question_rank)` holds (else 0): the shared shape of the terms that cost changing a question."""
    values: list[float | None] = []
    for rewrite, rank, ok, turn, question_rank in zip(rewrites, ranks, format_ok, turns, question_ranks, strict=True):
        if not ok:
            values.append(None)
        elif is_copy(rewrite, turn.question):
            values.append(0.0)
        else:
            values.append(-1.0 if charged(rank, question_rank) else 0.0)
    return values


def needless_rewrite_term(rewrites, ranks, format_ok, turns, question_ranks, **context) -> list[float | None]:
    """-1 for a well-formed rewrite that changes the question without ranking a gold passage higher than the
    question searched as asked did (same rank-incentive value or less), 0 for a copy of the question or a rewrite
    that gains. On a turn the question already solves, every sample may tie at rank 1 and the group's advantages
    are zero; with this term the copies win those ties, so the policy learns to leave self-contained questions
    alone while rewrites that help stay free."""

    def no_gain(rank, question_rank) -> bool:
        return rank_incentive_reward(rank, True) <= rank_incentive_reward(question_rank, True)

    return charge_changed_questions(rewrites, ranks, format_ok, turns, question_ranks, no_gain)


def rewrite_when_solved_term(rewrites, ranks, format_ok, turns, question_ranks, **context) -> list[float | None]:
    """-1 for a well-formed rewrite that changes a question which, searched as asked, already ranks a gold passage
    first; 0 for a copy and for every response on a turn the question does not solve. `needless_rewrite` charges
    ties on every turn, and on hard turns, where most samples miss, a copy then beats every failed rewrite: the
    policy learned to copy everywhere (bench/RESULTS.md, "Sixth session"). This term charges only where nothing can
    be gained, so on the other turns the helpful rewrites keep their whole advantage."""

    def question_solves(rank, question_rank) -> bool:
        return question_rank == 1

    return charge_changed_questions(rewrites, ranks, format_ok, turns, question_ranks, question_solves)


def leave_one_out_term(shape: RewardFunction) -> RewardTerm:
    """What each well-formed response adds to its group searched together, as the trained rewriter is asked at
    inference (`rewriter.num_samples`: a turn's rewrites searched together, their rankings combined):
    shape(rank of the group's well-formed rewrites combined) - shape(rank of the same without this one), where a
    group is the responses to one turn (a turn met twice in one batch makes one group of both) and a group of none
    is the question searched as asked. The group's value is the same for all its members, so under GRPO's group
    normalisation the term ranks a sample by how much the others lose without it: a rewrite that alone brings the
    gold passage up earns, one that several others already cover earns nothing, one that drags the combined ranking
    down pays. None for a malformed response."""

    def term(rewrites, ranks, format_ok, turns, rankings, combine, question_ranks, **context) -> list[float | None]:
        groups: dict[str, list[int]] = {}
        for i, (ok, turn) in enumerate(zip(format_ok, turns, strict=True)):
            if ok:
                groups.setdefault(turn.id, []).append(i)
        values: list[float | None] = [None] * len(ranks)
        for members in groups.values():
            turn, question_rank = turns[members[0]], question_ranks[members[0]]

            def rank_of(subset: list[int], turn=turn, question_rank=question_rank) -> int | None:
                if not subset:
                    return question_rank
                return best_gold_rank(combine([rankings[j] for j in subset]), turn.positives)

            whole = shape(rank_of(members), True)
            for i in members:
                values[i] = whole - shape(rank_of([j for j in members if j != i]), True)
        return values

    term.__name__ = f"leave_one_out_{shape.__name__}"
    return term


REWARD_TERMS: dict[str, RewardTerm] = {name: rank_term(fn) for name, fn in REWARD_FUNCTIONS.items()}
REWARD_TERMS.update({f"loo_{name}": leave_one_out_term(fn) for name, fn in REWARD_FUNCTIONS.items()})
REWARD_TERMS["format"] = format_term
REWARD_TERMS["below_question"] = below_question_term
REWARD_TERMS["needless_rewrite"] = needless_rewrite_term
REWARD_TERMS["rewrite_when_solved"] = rewrite_when_solved_term


@dataclass(frozen=True)
class WeightedTerm:
    name: str
    weight: float
    fn: RewardTerm

    @property
    def context_names(self) -> set[str]:
        """The context (`TERM_CONTEXT`) the term's function names as parameters."""
        return TERM_CONTEXT & set(inspect.signature(self.fn).parameters)


def resolve_term(name: str) -> RewardTerm:
    """A registered term, or a function given by its import path `package.module:function`."""
    if name in REWARD_TERMS:
        return REWARD_TERMS[name]
    if ":" in name:
        module_name, _, attribute = name.partition(":")
        try:
            fn = getattr(importlib.import_module(module_name), attribute)
        except (ImportError, AttributeError) as err:
            raise ConfigError(f"rl.rewards: cannot import reward term '{name}': {err}") from None
        if callable(fn):
            return fn
    valid = ", ".join(sorted(REWARD_TERMS))
    raise ConfigError(f"rl.rewards: unknown reward term '{name}'; use one of {valid} or 'package.module:function'")


def weighted_terms(entries) -> list[WeightedTerm]:
    """`rl.rewards` entries ({name, weight}) as resolved terms; at least one, with finite weights."""
    terms = []
    for entry in entries or []:
        name, weight = str(entry["name"]), float(entry.get("weight", 1.0))
        if weight != weight or weight in (float("inf"), float("-inf")):
            raise ConfigError(f"rl.rewards: the weight of '{name}' must be a finite number, got {weight}")
        terms.append(WeightedTerm(name, weight, resolve_term(name)))
    if not terms:
        raise ConfigError("rl.rewards is empty: give at least one term, e.g. [{name: rank_incentive, weight: 1.0}]")
    return terms


def combine_terms(values: dict[str, list[float | None]], weights: dict[str, float]) -> list[float]:
    """sum over terms of weight * value per response; None counts as 0. A term that returns a list of the wrong
    length or a value that is not a finite number stops training, naming the term (`rl.rewards`)."""
    lengths = {len(v) for v in values.values()}
    if len(lengths) != 1:
        sizes = ", ".join(f"'{name}': {len(vals)}" for name, vals in values.items())
        raise ValueError(f"rl.rewards: the reward terms returned lists of different lengths ({sizes})")
    (n,) = lengths
    for name, vals in values.items():
        bad = next((i for i, v in enumerate(vals) if v is not None and not math.isfinite(v)), None)
        if bad is not None:
            raise ValueError(
                f"rl.rewards: the reward term '{name}' returned {vals[bad]!r} for response {bad} of {n}; a term must "
                "return finite numbers (or None for no opinion)"
            )
    return [sum(weights[name] * (vals[i] or 0.0) for name, vals in values.items()) for i in range(n)]
