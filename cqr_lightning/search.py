"""What is searched for a turn, given its rewrite: the `search` settings (conf/search/default.yaml).

One `SearchPlan` is used identically by the GRPO reward, the warm-up's filter, validation, evaluation and
`rewriter=file`, so a rewriter is trained for the way it will be searched:

- `rewrite`: the rewrite alone (the paper's);
- `question_rewrite`: the question, then the rewrite, as one query (the rewrite adds what the question lacks);
- `fusion`: reciprocal rank fusion (RRF) of the question's ranking and the rewrite's ranking.

With `first_turn_as_asked` a turn without history is searched with its question as asked: there is nothing to
resolve, and a rewrite can only drift from it. A turn whose rewrite is missing is searched with its question.

A turn may have several rewrites (`rewriter.num_samples`: the greedy one and sampled ones). Each is searched as
the mode says and the rankings are combined by summing each passage's scores (within each ranking's cut: for
BM25 the ranking of one query holding them all, for a dense retriever that of their summed vectors); under
`fusion` the question's ranking and every rewrite's are fused by RRF. A rewrite that repeats the question counts
as the question, so the samples vote on how much of the question's own ranking to keep.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from cqr_lightning.errors import ConfigError
from cqr_lightning.formatting import is_copy
from cqr_lightning.records import Turn
from cqr_lightning.retrieval.base import Retriever, SearchHit

REWRITE, QUESTION_REWRITE, FUSION = "rewrite", "question_rewrite", "fusion"
QUERY_MODES = (REWRITE, QUESTION_REWRITE, FUSION)

TurnRewrites = str | Sequence[str] | None  # a turn's rewrite, its several sampled rewrites, or none


def as_tuple(rewrite: TurnRewrites) -> tuple[str, ...]:
    """A turn's rewrites as a tuple (empty for None)."""
    if rewrite is None:
        return ()
    return (rewrite,) if isinstance(rewrite, str) else tuple(rewrite)


@dataclass(frozen=True)
class SearchPlan:
    query_mode: str = REWRITE
    first_turn_as_asked: bool = True
    fusion_k: int = 60  # RRF's constant: score = sum over rankings of 1 / (fusion_k + rank)

    def __post_init__(self):
        if self.query_mode not in QUERY_MODES:
            raise ConfigError(f"search.query_mode={self.query_mode} is not one of {', '.join(QUERY_MODES)}")
        if self.fusion_k < 0:
            raise ConfigError(f"search.fusion_k must be >= 0, got {self.fusion_k}")

    @classmethod
    def from_config(cls, cfg) -> SearchPlan:
        """From a `search` config block; None (an old config without one) gives the defaults."""
        if cfg is None:
            return cls()
        return cls(
            query_mode=str(cfg.get("query_mode", REWRITE)),
            first_turn_as_asked=bool(cfg.get("first_turn_as_asked", True)),
            fusion_k=int(cfg.get("fusion_k", 60)),
        )

    def as_asked(self, turn: Turn, rewrite: TurnRewrites) -> bool:
        """Whether the turn is searched with its question alone: no rewrite, a first turn, or rewrites that all
        repeat the question word for word (`is_copy`)."""
        rewrites = as_tuple(rewrite)
        if not rewrites or (self.first_turn_as_asked and not turn.history):
            return True
        return all(is_copy(r, turn.question) for r in rewrites)

    def queries(self, turn: Turn, rewrite: TurnRewrites) -> list[str]:
        """The queries searched for the turn: one per rewrite (their rankings summed), or under fusion the
        question and each rewrite that is not a copy (their rankings fused by RRF)."""
        if self.as_asked(turn, rewrite):
            return [turn.question]
        rewrites = as_tuple(rewrite)
        if self.query_mode == FUSION:
            return [turn.question, *(r for r in rewrites if not is_copy(r, turn.question))]
        if self.query_mode == QUESTION_REWRITE:
            return [turn.question if is_copy(r, turn.question) else f"{turn.question} {r}" for r in rewrites]
        return [turn.question if is_copy(r, turn.question) else r for r in rewrites]

    def combine(self, rankings: Sequence[Sequence[SearchHit]], depth: int = 100) -> list[SearchHit]:
        """One ranking from the rankings of `queries`: RRF under fusion, else the sum of each passage's scores."""
        if len(rankings) == 1:
            return list(rankings[0])[:depth]
        if self.query_mode == FUSION:
            return reciprocal_rank_fusion(rankings, self.fusion_k, depth)
        return score_sum_fusion(rankings, depth)

    def single_query(self, turn: Turn, rewrite: TurnRewrites) -> str | None:
        """One query text that any BM25 engine ranks as this plan ranks the turn: `queries` joined by spaces (BM25
        adds its query terms' scores, so the joined query scores each passage as the sum over the queries; exact as
        long as a passage matched by one query is within every ranking's cut). None under fusion with several
        queries: no single BM25 query equals an RRF."""
        queries = self.queries(turn, rewrite)
        if self.query_mode == FUSION and len(queries) > 1:
            return None
        return " ".join(queries)

    def describe(self, turn: Turn, rewrite: TurnRewrites) -> str:
        """The searched text as one line, for logs and rewrites.jsonl (several queries joined by ' || ')."""
        return " || ".join(self.queries(turn, rewrite))


def reciprocal_rank_fusion(rankings: Sequence[Sequence[SearchHit]], k: int = 60, depth: int = 100) -> list[SearchHit]:
    """Fuse rankings: score(p) = sum of 1 / (k + rank of p) over the rankings holding p; best `depth` first.
    Ties keep the order in which passages were first met (ranking by ranking, best first)."""
    return _fuse(rankings, depth, lambda rank, hit: 1.0 / (k + rank))


def score_sum_fusion(rankings: Sequence[Sequence[SearchHit]], depth: int = 100) -> list[SearchHit]:
    """Fuse rankings of the same retriever: score(p) = sum of p's scores over the rankings holding it (a passage
    below a ranking's cut adds nothing there); best `depth` first, ties in the order passages were first met."""
    return _fuse(rankings, depth, lambda rank, hit: hit.score)


def _fuse(
    rankings: Sequence[Sequence[SearchHit]], depth: int, contribution: Callable[[int, SearchHit], float]
) -> list[SearchHit]:
    """Each passage's score is the sum of `contribution(rank, hit)` over the rankings holding it."""
    scores: dict[str, float] = {}
    for ranking in rankings:
        for rank, hit in enumerate(ranking, start=1):
            scores[hit.passage_id] = scores.get(hit.passage_id, 0.0) + contribution(rank, hit)
    order = sorted(scores, key=lambda pid: -scores[pid])  # sorted() is stable: first met wins ties
    return [SearchHit(pid, scores[pid]) for pid in order[:depth]]


def search_turns(
    retriever: Retriever, plan: SearchPlan, turns: Sequence[Turn], rewrites: Sequence[TurnRewrites], k: int = 100
) -> list[list[SearchHit]]:
    """The ranking of each turn searched as the plan says, with one retriever call for the whole batch."""
    if len(turns) != len(rewrites):
        raise ValueError(f"{len(turns)} turns but {len(rewrites)} rewrites")
    per_turn = [plan.queries(turn, rewrite) for turn, rewrite in zip(turns, rewrites, strict=True)]
    flat = [query for queries in per_turn for query in queries]
    runs = retriever.search(flat, k=k) if flat else []
    rankings, at = [], 0
    for queries in per_turn:
        parts = runs[at : at + len(queries)]
        at += len(queries)
        rankings.append(plan.combine(parts, k))
    return rankings
