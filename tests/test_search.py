"""What is searched for a turn (query modes, fusion, first turns as asked) and the in-domain held-out split."""

from __future__ import annotations

import json
from collections import Counter

import pytest
from omegaconf import OmegaConf

from cqr_lightning.errors import ConfigError
from cqr_lightning.evaluation import score_turns
from cqr_lightning.holdout import HOLDOUT_TEST, HOLDOUT_VAL, conversation_key, holdout_part
from cqr_lightning.readers import read_jsonl_turns, turn_reader
from cqr_lightning.records import Turn, Utterance
from cqr_lightning.retrieval.base import SearchHit
from cqr_lightning.retrieval.factory import open_retriever
from cqr_lightning.scoring import RetrievalScorer
from cqr_lightning.search import SearchPlan, reciprocal_rank_fusion, score_sum_fusion, search_turns

FIRST = Turn(id="c_1", history=(), question="Who invented the piano?", positives=("piano-1",))
LATER = Turn(
    id="c_2",
    history=(Utterance("user", "Who invented the piano?"), Utterance("assistant", "Cristofori.")),
    question="How many keys does it have?",
    positives=("piano-2",),
)


@pytest.fixture(scope="module")
def retriever(bm25s_cfg, data_cfg):
    with open_retriever(bm25s_cfg, data_cfg.corpus, show_progress=False) as r:
        yield r


def test_each_query_mode_searches_what_it_names():
    rewrite = "How many keys does a piano have?"
    assert SearchPlan("rewrite").queries(LATER, rewrite) == [rewrite]
    assert SearchPlan("question_rewrite").queries(LATER, rewrite) == [f"{LATER.question} {rewrite}"]
    assert SearchPlan("fusion").queries(LATER, rewrite) == [LATER.question, rewrite]
    assert SearchPlan("fusion").describe(LATER, rewrite) == f"{LATER.question} || {rewrite}"


@pytest.mark.parametrize("mode", ["rewrite", "question_rewrite", "fusion"])
def test_first_turns_copies_and_missing_rewrites_search_the_question_alone(mode):
    plan = SearchPlan(mode)
    assert plan.queries(FIRST, "Bartolomeo Cristofori piano inventor") == [FIRST.question]
    assert plan.as_asked(FIRST, "Bartolomeo Cristofori piano inventor")
    assert plan.queries(LATER, None) == [LATER.question] and plan.as_asked(LATER, None)
    assert plan.queries(LATER, "how many KEYS does it have") == [LATER.question]  # a copy, case and "?" aside
    assert not plan.as_asked(LATER, "piano keys")
    off = SearchPlan(mode, first_turn_as_asked=False)
    assert not off.as_asked(FIRST, "Bartolomeo Cristofori piano inventor")


def test_unknown_query_mode_names_the_setting():
    with pytest.raises(ConfigError, match="search.query_mode=both"):
        SearchPlan("both")
    plan = SearchPlan.from_config(OmegaConf.create({"query_mode": "fusion", "first_turn_as_asked": False}))
    assert plan == SearchPlan("fusion", first_turn_as_asked=False, fusion_k=60)


def test_reciprocal_rank_fusion_matches_hand_computed_scores():
    question = [SearchHit("a", 9.0), SearchHit("b", 8.0), SearchHit("c", 7.0)]
    rewrite = [SearchHit("c", 5.0), SearchHit("d", 4.0), SearchHit("a", 3.0)]
    fused = reciprocal_rank_fusion([question, rewrite], k=1, depth=3)
    # a: 1/2 + 1/4 = 0.75; c: 1/4 + 1/2 = 0.75 (a met first); b: 1/3; d: 1/3 (b met first)
    assert [hit.passage_id for hit in fused] == ["a", "c", "b"]
    assert [hit.score for hit in fused] == pytest.approx([0.75, 0.75, 1 / 3])


def test_search_turns_fuses_the_question_and_rewrite_rankings_of_the_real_index(retriever):
    rewrite = "Tokyo Tower lattice opened"
    turn = Turn(
        id="t", history=(Utterance("user", "What is the capital of Japan?"),), question="When did its tower open?",
        positives=("tokyo-2",),
    )  # fmt: skip
    [fused] = search_turns(retriever, SearchPlan("fusion"), [turn], [rewrite], k=12)
    by_question, by_rewrite = retriever.search([turn.question, rewrite], k=12)
    expected = reciprocal_rank_fusion([by_question, by_rewrite], k=60, depth=12)
    assert fused == expected
    [joined] = search_turns(retriever, SearchPlan("question_rewrite"), [turn], [rewrite], k=12)
    assert joined == retriever.search([f"{turn.question} {rewrite}"], k=12)[0]


def test_several_rewrites_give_one_query_each_and_copies_stand_for_the_question():
    rewrites = ("How many keys does a piano have?", "how many KEYS does it have", "piano key count")
    q = LATER.question
    assert SearchPlan("question_rewrite").queries(LATER, rewrites) == [f"{q} {rewrites[0]}", q, f"{q} {rewrites[2]}"]
    assert SearchPlan("rewrite").queries(LATER, rewrites) == [rewrites[0], q, rewrites[2]]
    assert SearchPlan("fusion").queries(LATER, rewrites) == [q, rewrites[0], rewrites[2]]
    for mode in ("rewrite", "question_rewrite", "fusion"):
        plan = SearchPlan(mode)
        assert not plan.as_asked(LATER, rewrites)
        assert plan.as_asked(LATER, ("How many keys does it have?", "how many keys does it have"))
        assert plan.queries(FIRST, rewrites) == [FIRST.question]
        assert plan.queries(LATER, [rewrites[0]]) == plan.queries(LATER, rewrites[0])


def test_score_sum_fusion_adds_each_passages_scores_and_keeps_first_met_on_ties():
    one = [SearchHit("a", 3.0), SearchHit("b", 2.0), SearchHit("c", 1.0)]
    two = [SearchHit("c", 4.0), SearchHit("b", 1.0), SearchHit("d", 0.5)]
    fused = score_sum_fusion([one, two], depth=3)
    # a: 3; b: 3 (a met first); c: 5; d: 0.5 (cut)
    assert [hit.passage_id for hit in fused] == ["c", "a", "b"]
    assert [hit.score for hit in fused] == pytest.approx([5.0, 3.0, 3.0])


def test_several_rewrites_on_the_real_bm25_index_rank_as_one_query_holding_them_all(retriever):
    """BM25 adds a query's terms' scores, so summing the rankings of 'question r1' and 'question r2' ranks the
    passages as the single query 'question r1 question r2' (every passage matched is within the cut here)."""
    turn = Turn(
        id="t", history=(Utterance("user", "What is the capital of Japan?"),), question="When did its tower open?",
        positives=("tokyo-2",),
    )  # fmt: skip
    rewrites = ("Tokyo Tower lattice opened", "When did Tokyo Tower open to the public")
    k = retriever.num_docs
    [summed] = search_turns(retriever, SearchPlan("question_rewrite"), [turn], [rewrites], k=k)
    single = SearchPlan("question_rewrite").single_query(turn, rewrites)
    assert single == f"{turn.question} {rewrites[0]} {turn.question} {rewrites[1]}"
    [joined] = retriever.search([single], k=k)
    assert [h.passage_id for h in summed] == [h.passage_id for h in joined]
    assert [h.score for h in summed] == pytest.approx([h.score for h in joined], rel=1e-5)
    [fused] = search_turns(retriever, SearchPlan("fusion"), [turn], [rewrites], k=12)
    expected = reciprocal_rank_fusion(retriever.search([turn.question, *rewrites], k=12), k=60, depth=12)
    assert fused == expected
    assert SearchPlan("fusion").single_query(turn, rewrites) is None


def test_scorer_and_evaluation_search_rewrites_the_same_way(retriever, data_cfg):
    turns = [t for t in read_jsonl_turns(f"{data_cfg.dir}/dev.jsonl")]
    rewrites = ["zebra quartz violin" for _ in turns]  # a useless rewrite: fusion keeps the question's ranking
    for mode in ("rewrite", "question_rewrite", "fusion"):
        plan = SearchPlan(mode)
        scorer = RetrievalScorer(retriever, plan, response_format="rewrite_only")
        results = score_turns(turns, rewrites, retriever, plan)
        assert [r.best_rank for r in results] == scorer.best_ranks(rewrites, turns)
        batch = scorer.score(turns, [f"<rewrite> {w} </rewrite>" for w in rewrites])
        assert batch.ranks == [r.best_rank for r in results]
        first = [not t.history for t in turns]
        assert [r.as_asked for r in results] == first and batch.copies == first
    raw = score_turns(turns, [t.question for t in turns], retriever)
    useless = score_turns(turns, rewrites, retriever, SearchPlan("rewrite"))
    later = [i for i, t in enumerate(turns) if t.history]
    assert all(useless[i].best_rank != raw[i].best_rank for i in later)


def test_evaluation_refuses_repeated_turn_ids(retriever):
    with pytest.raises(ValueError, match="turn id 'c_2' appears more than once"):
        score_turns([LATER, FIRST, LATER], ["a", "b", "c"], retriever)


def write_conversations(folder, n_conversations: int, turns_each: int = 3):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "corpus.jsonl").write_text(json.dumps({"id": "p", "title": "t", "contents": "text"}) + "\n")
    rows = []
    for c in range(n_conversations):
        history: list[dict] = []
        for t in range(turns_each):
            rows.append(
                {"id": f"conv{c}-{t}", "history": list(history), "question": f"q{t} of {c}", "positives": ["p"]}
            )
            history += [{"role": "user", "text": f"q{t} of {c}"}, {"role": "assistant", "text": "a"}]
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return OmegaConf.create(
        {"format": "jsonl", "dir": str(folder), "corpus": str(folder / "corpus.jsonl"), "train_split": "train",
         "eval_split": "dev", "holdout": {"val": 0.15, "test": 0.15}}
    )  # fmt: skip


def test_holdout_sets_whole_conversations_aside_deterministically(tmp_path):
    cfg = write_conversations(tmp_path / "data", 200)
    parts = {split: list(turn_reader(cfg, split)()) for split in ("train", HOLDOUT_VAL, HOLDOUT_TEST)}
    ids = {split: {t.id for t in turns} for split, turns in parts.items()}
    assert sum(len(v) for v in ids.values()) == 600 and not (ids["train"] & ids[HOLDOUT_VAL])
    assert not (ids["train"] & ids[HOLDOUT_TEST]) and not (ids[HOLDOUT_VAL] & ids[HOLDOUT_TEST])
    conversations = {split: {conversation_key(t) for t in turns} for split, turns in parts.items()}
    assert not (conversations["train"] & (conversations[HOLDOUT_VAL] | conversations[HOLDOUT_TEST]))
    per_conversation = Counter(conversation_key(t) for t in parts[HOLDOUT_VAL])
    assert set(per_conversation.values()) == {3}, "a held-out conversation keeps all its turns"
    assert 0.08 < len(conversations[HOLDOUT_VAL]) / 200 < 0.22 and 0.08 < len(conversations[HOLDOUT_TEST]) / 200 < 0.22
    # the parts do not depend on the file order
    lines = (tmp_path / "data" / "train.jsonl").read_text().splitlines()
    (tmp_path / "data" / "train.jsonl").write_text("\n".join(reversed(lines)) + "\n")
    assert {t.id for t in turn_reader(cfg, HOLDOUT_VAL)()} == ids[HOLDOUT_VAL]
    assert all(holdout_part(t, 0.15, 0.15) == HOLDOUT_VAL for t in parts[HOLDOUT_VAL])


def test_holdout_settings_are_checked(tmp_path):
    cfg = write_conversations(tmp_path / "data", 4)
    cfg.holdout = {"val": 0.6, "test": 0.5}
    with pytest.raises(ConfigError, match="data.holdout.val=0.6"):
        turn_reader(cfg, "train")
    cfg.holdout = {"val": 0.2, "test": 0.0}
    with pytest.raises(ConfigError, match="data.holdout.test"):
        turn_reader(cfg, HOLDOUT_TEST)
    cfg.holdout = None
    assert len(list(turn_reader(cfg, "train")())) == 12
