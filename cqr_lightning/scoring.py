"""The retrieval scorer: the service both training stages are given to judge rewrites with the retriever.

`RetrievalScorer` holds the retriever, the search plan (cqr_lightning/search.py) and the reward terms
(cqr_lightning/grpo/reward_terms.py). The
warm-up's filter asks it for gold ranks (`best_ranks`), GRPO for rewards (`score`), validation for per-turn
metrics (`evaluate`): all three search a rewrite the same way. Modules receive it in their constructor;
callbacks only read what it last scored (`last`) to log it.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from omegaconf import OmegaConf

from cqr_lightning.errors import RetrievalError
from cqr_lightning.evaluation import TurnResult, results_from_rankings
from cqr_lightning.formatting import parse_response
from cqr_lightning.grpo.reward_terms import WeightedTerm, combine_terms, weighted_terms
from cqr_lightning.prompts import THINK_REWRITE
from cqr_lightning.records import Turn
from cqr_lightning.retrieval.base import Retriever, SearchHit, best_gold_rank
from cqr_lightning.search import SearchPlan, search_turns

# Gold-rank buckets for statistics: (label, lowest rank, highest rank); a rank beyond them is "not_found".
RANK_BUCKETS = (("rank_1", 1, 1), ("rank_2_3", 2, 3), ("rank_4_10", 4, 10), ("rank_11_100", 11, 100))
NOT_FOUND = "not_found"


def rank_bucket(rank: int | None) -> str:
    """The label of the bucket a best gold rank falls in."""
    for label, low, high in RANK_BUCKETS:
        if rank is not None and low <= rank <= high:
            return label
    return NOT_FOUND


@dataclass
class RewardBatch:
    rewards: list[float]
    ranks: list[int | None]
    format_ok: list[bool]
    rewrites: list[str | None]
    # whether each rewrite was searched as the question alone (a copy, or a first turn; a malformed response is
    # not searched and is no copy)
    copies: list[bool] = field(default_factory=list)
    terms: dict[str, list[float | None]] = field(default_factory=dict)  # each reward term's values, unweighted


def reward_statistics(batch: RewardBatch, group_size: int) -> dict[str, float]:
    """Mean/std reward, format failures, gold-rank histogram (shares) and flat groups."""
    n = len(batch.rewards)
    rewards = torch.tensor(batch.rewards, dtype=torch.float64)
    valid_ranks = [r for r, ok in zip(batch.ranks, batch.format_ok, strict=True) if ok]
    stats = {
        "reward_mean": rewards.mean().item(),
        "reward_std": rewards.std().item() if n > 1 else 0.0,
        "format_failure_rate": 1 - sum(batch.format_ok) / n,
        "rewrite_words": sum(len((w or "").split()) for w in batch.rewrites) / n,
    }
    if batch.copies:
        stats["copy_rate"] = sum(batch.copies) / n
    for name, values in batch.terms.items():
        stats[f"reward_{term_key(name)}"] = sum(v or 0.0 for v in values) / n
    buckets = [rank_bucket(r) for r in valid_ranks]
    for label, _, _ in RANK_BUCKETS:
        stats[f"gold_{label}"] = buckets.count(label) / n
    stats[f"gold_{NOT_FOUND}"] = buckets.count(NOT_FOUND) / n
    if group_size > 1 and n % group_size == 0:
        groups = rewards.reshape(-1, group_size)
        stats["flat_group_share"] = (groups.amax(1) == groups.amin(1)).double().mean().item()
    return stats


def open_reward_retriever(retriever_cfg, corpus_path: str | None, max_query_words: int | None = None) -> Retriever:
    """Open the retriever that scores rewrites, queries cut to `max_query_words`; a failure names what to check."""
    from cqr_lightning.retrieval.factory import open_retriever

    cfg = OmegaConf.to_container(OmegaConf.create(retriever_cfg), resolve=True)
    if max_query_words:
        cfg["max_query_words"] = max_query_words
    try:
        return open_retriever(cfg, corpus_path)
    except Exception as err:
        raise RetrievalError(
            f"could not open retriever '{cfg.get('name')}' over {corpus_path}: {err} "
            "(check retriever=... and data.corpus)"
        ) from err


def term_key(name: str) -> str:
    """A reward term's name as a metric-name fragment ('mrr@3' -> 'mrr_at_3', 'pkg.mod:fn' -> 'pkg_mod_fn')."""
    return name.replace("@", "_at_").replace(":", "_").replace(".", "_")


SPEC_REWARD = ({"name": "rank_incentive", "weight": 1.0}, {"name": "format", "weight": 1.0})


def gold_ranks(rankings: Sequence[list[SearchHit] | None], turns: Sequence[Turn]) -> list[int | None]:
    """Best gold rank of each ranking (rankings[i] answers turns[i]); None for no ranking or no gold in it."""
    pairs = zip(rankings, turns, strict=True)
    return [None if hits is None else best_gold_rank(hits, turn.positives) for hits, turn in pairs]


class RetrievalScorer:
    """Judges rewrites by where the retriever ranks a gold passage, searching them as `plan` says."""

    def __init__(
        self,
        retriever: Retriever,
        plan: SearchPlan | None = None,
        rewards: list[WeightedTerm] | None = None,
        response_format: str = THINK_REWRITE,
        depth: int = 100,
    ):
        self.retriever = retriever
        self.plan = plan or SearchPlan()
        self.rewards = rewards if rewards is not None else weighted_terms(SPEC_REWARD)
        self.response_format = response_format
        self.depth = depth
        self.last: tuple[list[Turn], list[str], RewardBatch] | None = None
        self._question_ranks: dict[str, int | None] = {}

    def rankings(self, turns: Sequence[Turn], rewrites: Sequence[str | None]):
        """Each turn's ranking; a failing retriever stops training with a clear error."""
        try:
            return search_turns(self.retriever, self.plan, turns, rewrites, k=self.depth)
        except Exception as err:
            raise RetrievalError(
                f"retrieval failed while scoring {len(turns)} rewrites: {err}. Training stopped; the last "
                "checkpoint is intact (resume with ckpt_path=...)."
            ) from err

    def best_ranks(self, rewrites: Sequence[str | None], turns: Sequence[Turn]) -> list[int | None]:
        """Best gold rank per rewrite (rewrites[i] belongs to turns[i]), None when none is in the top `depth`."""
        return gold_ranks(self.rankings(turns, rewrites), turns)

    def score(self, turns: Sequence[Turn], responses: Sequence[str]) -> RewardBatch:
        """Reward each response (turns[i] is the turn response i answers); a malformed one is not searched."""
        parsed = [parse_response(text, self.response_format) for text in responses]
        scored = [i for i, p in enumerate(parsed) if p.format_ok]
        rankings: list[list[SearchHit] | None] = [None] * len(parsed)
        if scored:
            found = self.rankings([turns[i] for i in scored], [parsed[i].rewrite for i in scored])
            for i, hits in zip(scored, found, strict=True):
                rankings[i] = hits
        ranks = gold_ranks(rankings, turns)
        rewrites, format_ok = [p.rewrite for p in parsed], [p.format_ok for p in parsed]
        context = self.term_context(turns, rankings)
        terms = {term.name: term.fn(rewrites, ranks, format_ok, list(turns), **context) for term in self.rewards}
        batch = RewardBatch(
            rewards=combine_terms(terms, {term.name: term.weight for term in self.rewards}),
            ranks=ranks,
            format_ok=format_ok,
            rewrites=rewrites,
            copies=[
                p.rewrite is not None and self.plan.as_asked(t, p.rewrite) for p, t in zip(parsed, turns, strict=True)
            ],
            terms=terms,
        )
        self.last = (list(turns), list(responses), batch)
        return batch

    def term_context(self, turns: Sequence[Turn], rankings: list[list[SearchHit] | None]) -> dict:
        """What the reward terms name beyond the per-response lists (`TERM_CONTEXT`), computed only when named."""
        wanted = set().union(*(term.context_names for term in self.rewards))
        context = {}
        if "question_ranks" in wanted:
            context["question_ranks"] = self.question_ranks(turns)
        if "rankings" in wanted:
            context["rankings"] = rankings
        if "combine" in wanted:
            context["combine"] = functools.partial(self.plan.combine, depth=self.depth)
        return context

    def question_ranks(self, turns: Sequence[Turn]) -> list[int | None]:
        """Best gold rank of each turn's question searched as asked; searched once per turn id and remembered."""
        missing = list({turn.id: turn for turn in turns if turn.id not in self._question_ranks}.values())
        if missing:
            found = self.best_ranks([None] * len(missing), missing)
            self._question_ranks.update((turn.id, rank) for turn, rank in zip(missing, found, strict=True))
        return [self._question_ranks[turn.id] for turn in turns]

    def evaluate(self, turns: Sequence[Turn], rewrites: Sequence[str | None]) -> list[TurnResult]:
        """Per-turn ranks and metrics of the rewrites, searched as the plan says."""
        return results_from_rankings(turns, rewrites, self.rankings(turns, rewrites), self.plan)
