"""Is one rewriter's gain over another real? A paired randomization test on per-turn metrics.

Two evaluations of the same turns (the `rewrites.jsonl` that `cqr_lightning.evaluate` and the pipeline's table
write) are compared turn by turn. Under the null hypothesis the two rewriters are exchangeable on every turn, so
the sign of each per-turn difference is a coin flip; the p-value is the share of sign assignments whose mean
difference is at least as far from zero as the observed one (two-sided, with the observed assignment counted).

    python -m cqr_lightning.significance runs/x/eval/raw_question/rewrites.jsonl \
        runs/x/eval/after_grpo/rewrites.jsonl --metric mrr@3

Several candidate files (runs of the same recipe with different seeds) are averaged turn by turn first, so the
test asks whether the recipe, not one lucky run, beats the baseline. To compare two recipes seed-averaged on both
sides, give the baseline recipe's other seeds with `--baseline-also` (repeatable):

    python -m cqr_lightning.significance a-seed0.jsonl b-seed0.jsonl b-seed1.jsonl \
        --baseline-also a-seed1.jsonl --metric mrr@3

`--turns <the evaluated split's JSONL>` adds the same test within first turns, later turns and each `source`.

Turns of one conversation are not independent (a rewriter that misreads a topic misreads it for several turns), so
a claim about conversations the model has never seen is tested with `--by-conversation` (needs `--turns`): the
signs are flipped per conversation, all of its turns together, which asks whether the gain holds across
conversations rather than across turns. Conversations are known as the held-out split knows them
(`cqr_lightning.holdout.conversation_key`: the first user message).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cqr_lightning.errors import DataError
from cqr_lightning.metrics import METRIC_NAMES
from cqr_lightning.readers import iter_jsonl_objects

_SIGN_BLOCK = 1000  # sign assignments drawn at a time


@dataclass(frozen=True)
class PairedComparison:
    mean_difference: float  # candidate minus baseline, in the metric's own scale
    p_value: float
    better: int  # turns where the candidate scores higher
    worse: int
    equal: int
    samples: int
    conversations: int | None = None  # signs flipped per conversation, this many; None: per turn

    def describe(self, metric: str) -> str:
        turns = self.better + self.worse + self.equal
        unit = f"per conversation, {self.conversations}" if self.conversations is not None else "per turn"
        return (
            f"candidate - baseline: {100 * self.mean_difference:+.2f} {metric} points over {turns} turns "
            f"(better on {self.better}, worse on {self.worse}, equal on {self.equal}); "
            f"two-sided paired randomization test p = {self.p_value:.4f} ({self.samples:,} sign flips, {unit})"
        )


def paired_randomization_test(
    baseline: Sequence[float],
    candidate: Sequence[float],
    *,
    conversations: Sequence[str] | None = None,
    samples: int = 10_000,
    seed: int = 0,
) -> PairedComparison:
    """Two-sided sign-flip test of the mean per-turn difference `candidate - baseline`. With `conversations`
    (each turn's conversation), one sign flips all the differences of a conversation together."""
    if len(baseline) != len(candidate):
        raise ValueError(f"paired scores differ in length: {len(baseline)} against {len(candidate)}")
    if not baseline:
        raise ValueError("no paired scores to compare")
    if samples < 1:
        raise ValueError("samples must be at least 1")
    if conversations is not None and len(conversations) != len(baseline):
        raise ValueError(f"{len(conversations)} conversation labels for {len(baseline)} paired scores")
    differences = np.asarray(candidate, dtype=np.float64) - np.asarray(baseline, dtype=np.float64)
    observed = differences.mean()
    flipped_units = differences  # what one sign multiplies: a turn's difference, or a conversation's sum
    if conversations is not None:
        _, conversation_of = np.unique(np.asarray(conversations, dtype=object).astype(str), return_inverse=True)
        flipped_units = np.bincount(conversation_of, weights=differences)
    rng = np.random.default_rng(seed)
    at_least_as_far = 0
    for start in range(0, samples, _SIGN_BLOCK):  # blocks keep memory flat for large evaluations
        signs = rng.choice((-1.0, 1.0), size=(min(_SIGN_BLOCK, samples - start), flipped_units.size))
        flipped = np.abs(signs @ flipped_units) / differences.size
        at_least_as_far += int(np.count_nonzero(flipped >= abs(observed) - 1e-12))
    return PairedComparison(
        mean_difference=float(observed),
        p_value=(at_least_as_far + 1) / (samples + 1),
        better=int(np.count_nonzero(differences > 0)),
        worse=int(np.count_nonzero(differences < 0)),
        equal=int(np.count_nonzero(differences == 0)),
        samples=samples,
        conversations=None if conversations is None else int(flipped_units.size),
    )


def per_turn_scores(path: str | Path, metric: str) -> dict[str, float]:
    """`metric` of every turn with gold passages in an evaluation's rewrites.jsonl, by turn id."""
    scores: dict[str, float] = {}
    for line_no, row in iter_jsonl_objects(path):
        if "id" not in row:
            raise DataError(path, "no 'id' (expected the rewrites.jsonl of an evaluation)", line_no)
        if row["id"] in scores:
            raise DataError(path, f"turn '{row['id']}' appears twice", line_no)
        if metric in row:
            scores[row["id"]] = float(row[metric])
    if not scores:
        raise DataError(path, f"no turn carries '{metric}' (metrics: {', '.join(METRIC_NAMES)})")
    return scores


def _require_same_turns(
    reference: dict[str, float], reference_path: str | Path, other: dict[str, float], other_path: str | Path
) -> None:
    if reference.keys() != other.keys():
        only = sorted(reference.keys() - other.keys()) or sorted(other.keys() - reference.keys())
        raise DataError(
            other_path,
            f"does not score the same turns as {reference_path} ({len(other)} against {len(reference)} "
            f"turns; e.g. '{only[0]}' is in one only)",
        )


def _as_path_list(paths: str | Path | Sequence[str | Path]) -> list[str | Path]:
    return [paths] if isinstance(paths, (str, Path)) else list(paths)


def paired_means(
    baseline_paths: str | Path | Sequence[str | Path],
    candidate_paths: str | Path | Sequence[str | Path],
    metric: str = "mrr@3",
) -> tuple[list[str], list[float], list[float]]:
    """The turns both sides score, with each side's per-turn `metric` averaged over its files (one recipe's seeds);
    every file must score the same turns."""
    baseline_paths, candidate_paths = _as_path_list(baseline_paths), _as_path_list(candidate_paths)
    if not baseline_paths:
        raise ValueError("no baseline evaluation to compare against")
    if not candidate_paths:
        raise ValueError("no candidate evaluation to compare")
    reference_path = baseline_paths[0]
    reference = per_turn_scores(reference_path, metric)
    baselines = [reference] + [per_turn_scores(path, metric) for path in baseline_paths[1:]]
    candidates = [per_turn_scores(path, metric) for path in candidate_paths]
    for path, scores in zip(baseline_paths[1:] + candidate_paths, baselines[1:] + candidates, strict=True):
        _require_same_turns(reference, reference_path, scores, path)
    turns = sorted(reference)
    baseline_means = [float(np.mean([scores[t] for scores in baselines])) for t in turns]
    candidate_means = [float(np.mean([scores[t] for scores in candidates])) for t in turns]
    return turns, baseline_means, candidate_means


def conversations_of(turns: Sequence[str], conversation: dict[str, str], turn_file: str | Path) -> list[str]:
    """Each turn's conversation from `conversation` (turn id -> conversation, read from `turn_file`)."""
    missing = [turn for turn in turns if turn not in conversation]
    if missing:
        raise DataError(
            turn_file,
            f"does not hold {len(missing)} of the {len(turns)} evaluated turns (e.g. '{missing[0]}'): give the "
            "turn file of the evaluated split",
        )
    return [conversation[turn] for turn in turns]


def read_turn_file(turn_file: str | Path) -> list:
    """The evaluated split's turns (their gold passages may be absent: only ids, history and source are used)."""
    from cqr_lightning.readers import read_jsonl_turns

    return list(read_jsonl_turns(turn_file, positives_optional=True))


def conversation_by_turn(turns: Sequence) -> dict[str, str]:
    """Turn id -> conversation key (the first user message, as the held-out split groups turns)."""
    from cqr_lightning.holdout import conversation_key

    return {turn.id: conversation_key(turn) for turn in turns}


def compare_files(
    baseline_paths: str | Path | Sequence[str | Path],
    candidate_paths: str | Path | Sequence[str | Path],
    metric: str = "mrr@3",
    *,
    by_conversation_in: str | Path | None = None,
    samples: int = 10_000,
    seed: int = 0,
) -> PairedComparison:
    """Pair evaluations of the same turns and test the candidate's mean difference. Several files on either
    side (one recipe's seeds) are averaged turn by turn first; every file must score the same turns. With
    `by_conversation_in` (the evaluated split's turn file), signs flip per conversation."""
    turns, baseline_means, candidate_means = paired_means(baseline_paths, candidate_paths, metric)
    conversations = None
    if by_conversation_in is not None:
        conversation = conversation_by_turn(read_turn_file(by_conversation_in))
        conversations = conversations_of(turns, conversation, by_conversation_in)
    return paired_randomization_test(
        baseline_means, candidate_means, conversations=conversations, samples=samples, seed=seed
    )


def compare_files_by_group(
    baseline_paths: str | Path | Sequence[str | Path],
    candidate_paths: str | Path | Sequence[str | Path],
    groups: dict[str, Sequence[str]],
    metric: str = "mrr@3",
    *,
    conversation: dict[str, str] | None = None,
    samples: int = 10_000,
    seed: int = 0,
) -> dict[str, PairedComparison]:
    """`compare_files` within each group of turn ids (e.g. `evaluation.turn_groups`: first turns, later turns,
    each source); ids the evaluations do not score are ignored, and groups left empty are left out. With
    `conversation` (turn id -> conversation), signs flip per conversation within each group."""
    turns, baseline_means, candidate_means = paired_means(baseline_paths, candidate_paths, metric)
    return compare_by_group(
        turns, baseline_means, candidate_means, groups, conversation=conversation, samples=samples, seed=seed
    )


def compare_by_group(
    turns: Sequence[str],
    baseline_means: Sequence[float],
    candidate_means: Sequence[float],
    groups: dict[str, Sequence[str]],
    *,
    conversation: dict[str, str] | None = None,
    samples: int = 10_000,
    seed: int = 0,
) -> dict[str, PairedComparison]:
    """The paired test within each group of turn ids, on per-turn means already paired (`paired_means`)."""
    place = {turn: i for i, turn in enumerate(turns)}
    results = {}
    for name, ids in groups.items():
        members = [place[i] for i in ids if i in place]
        if members:
            results[name] = paired_randomization_test(
                [baseline_means[i] for i in members],
                [candidate_means[i] for i in members],
                conversations=None if conversation is None else [conversation[turns[i]] for i in members],
                samples=samples,
                seed=seed,
            )
    return results


def main(argv: Sequence[str] | None = None) -> PairedComparison:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("baseline", type=Path, help="rewrites.jsonl of the baseline (e.g. raw_question)")
    parser.add_argument(
        "candidate", type=Path, nargs="+", help="rewrites.jsonl of the rewriter under test; several: averaged per turn"
    )
    parser.add_argument(
        "--baseline-also",
        type=Path,
        action="append",
        default=[],
        metavar="PATH",
        help="another run of the baseline recipe (a seed), averaged per turn with the baseline; repeatable",
    )
    parser.add_argument(
        "--turns",
        type=Path,
        metavar="PATH",
        help="the evaluated turn file (JSONL): also test within first turns, later turns and each source",
    )
    parser.add_argument(
        "--by-conversation",
        action="store_true",
        help="flip signs per conversation (all its turns together, read from --turns): the test for unseen ones",
    )
    parser.add_argument("--metric", default="mrr@3", choices=METRIC_NAMES)
    parser.add_argument("--samples", type=int, default=10_000, help="random sign flips")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.by_conversation and args.turns is None:
        parser.error("--by-conversation reads each turn's conversation from --turns: give the evaluated split's file")
    baselines = [args.baseline, *args.baseline_also]
    turns, baseline_means, candidate_means = paired_means(baselines, args.candidate, args.metric)
    evaluated_split = read_turn_file(args.turns) if args.turns is not None else []
    conversation = conversation_by_turn(evaluated_split) if args.by_conversation else None
    result = paired_randomization_test(
        baseline_means,
        candidate_means,
        conversations=None if conversation is None else conversations_of(turns, conversation, args.turns),
        samples=args.samples,
        seed=args.seed,
    )
    print(result.describe(args.metric))
    if args.turns is not None:
        from cqr_lightning.evaluation import turn_groups

        by_group = compare_by_group(
            turns, baseline_means, candidate_means, turn_groups(evaluated_split), conversation=conversation,
            samples=args.samples, seed=args.seed,
        )  # fmt: skip
        for name, comparison in by_group.items():
            print(f"  {name}: {comparison.describe(args.metric)}")
    return result


if __name__ == "__main__":
    main()
