"""GRPO rewards as weighted terms: SPEC's reward by default, and a new reward as one function plus one config entry."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from cqr_lightning.errors import ConfigError
from cqr_lightning.grpo.reward_terms import REWARD_TERMS, combine_terms, weighted_terms
from cqr_lightning.grpo.rewards import rank_incentive_reward
from cqr_lightning.records import Turn
from cqr_lightning.retrieval.factory import open_retriever
from cqr_lightning.scoring import SPEC_REWARD, RetrievalScorer, reward_statistics
from cqr_lightning.search import SearchPlan

RANKS = [1, 2, 10, 11, 57, 100, None, 3, None]
FORMAT_OK = [True, True, True, True, True, True, True, False, False]


def test_default_terms_sum_to_the_spec_reward():
    terms = weighted_terms(SPEC_REWARD)
    n = len(RANKS)
    values = {t.name: t.fn(["w"] * n, RANKS, FORMAT_OK, [None] * n, question_ranks=[1] * n) for t in terms}
    total = combine_terms(values, {t.name: t.weight for t in terms})
    assert total == pytest.approx([rank_incentive_reward(r, ok) for r, ok in zip(RANKS, FORMAT_OK, strict=True)])
    assert total[-2:] == [-0.1, -0.1]


def test_weights_scale_each_term_and_none_counts_as_zero():
    values = {"a": [1.0, None, 2.0], "b": [0.5, 0.5, None]}
    assert combine_terms(values, {"a": 2.0, "b": -1.0}) == [1.5, -0.5, 4.0]
    with pytest.raises(ValueError, match="different lengths \\('a': 1, 'b': 2\\)"):
        combine_terms({"a": [1.0], "b": [1.0, 2.0]}, {"a": 1.0, "b": 1.0})


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_a_term_returning_a_non_finite_value_is_named(value):
    with pytest.raises(ValueError, match=f"reward term 'mine' returned {value!r} for response 1 of 3"):
        combine_terms({"format": [0.0, 0.0, -0.1], "mine": [1.0, value, None]}, {"format": 1.0, "mine": 1.0})


def test_bad_reward_settings_name_the_setting():
    with pytest.raises(ConfigError, match="unknown reward term 'mrr'"):
        weighted_terms([{"name": "mrr"}])
    with pytest.raises(ConfigError, match="cannot import reward term 'nowhere.at_all:fn'"):
        weighted_terms([{"name": "nowhere.at_all:fn"}])
    with pytest.raises(ConfigError, match="rl.rewards is empty"):
        weighted_terms([])
    with pytest.raises(ConfigError, match="finite number"):
        weighted_terms([{"name": "format", "weight": float("nan")}])
    names = {"rank_incentive", "mrr@3", "ndcg@3", "recall@10", "recall@100", "format", "below_question"}
    names |= {"needless_rewrite", "rewrite_when_solved"}
    names |= {"loo_rank_incentive", "loo_mrr@3", "loo_ndcg@3", "loo_recall@10", "loo_recall@100"}
    assert set(REWARD_TERMS) == names


BREVITY = '''
def brevity(rewrites, ranks, format_ok, turns, **context):
    """A user's own term: minus the number of words beyond the question's, None without a rewrite."""
    return [None if w is None else -max(0, len(w.split()) - len(t.question.split())) for w, t in zip(rewrites, turns)]
'''


def test_a_new_reward_is_one_function_and_one_config_entry(tmp_path, monkeypatch, bm25s_cfg, data_cfg):
    (tmp_path / "my_rewards.py").write_text(BREVITY)
    monkeypatch.syspath_prepend(str(tmp_path))
    entries = OmegaConf.create({"rewards": [*SPEC_REWARD, {"name": "my_rewards:brevity", "weight": 0.5}]})
    terms = weighted_terms(OmegaConf.to_container(entries.rewards))
    turn = Turn(id="t", history=(), question="When did the Tokyo Tower open?", positives=("tokyo-2",))
    responses = [
        "<rewrite> When did the Tokyo Tower open? </rewrite>",
        "<rewrite> When did the Tokyo Tower open in Japan, the lattice tower? </rewrite>",
        "no tags at all",
    ]
    with open_retriever(bm25s_cfg, data_cfg.corpus, show_progress=False) as retriever:
        spec = RetrievalScorer(retriever, response_format="rewrite_only").score([turn] * 3, responses)
        batch = RetrievalScorer(retriever, rewards=terms, response_format="rewrite_only").score([turn] * 3, responses)
    assert batch.terms["my_rewards:brevity"] == [0, -5, None]
    assert batch.rewards == pytest.approx([spec.rewards[0], spec.rewards[1] - 2.5, -0.1])
    stats = reward_statistics(batch, group_size=3)
    assert stats["reward_my_rewards_brevity"] == pytest.approx(-5 / 3)
    assert stats["reward_format"] == pytest.approx(-0.1 / 3)


def test_below_question_costs_only_what_the_rewrite_loses_against_the_question():
    from cqr_lightning.grpo.reward_terms import below_question_term

    ranks = [3, 1, None, 20, 4]
    ok = [True, True, True, True, False]
    question_ranks = [1, 5, 2, None, 1]
    values = below_question_term([None] * 5, ranks, ok, [None] * 5, question_ranks=question_ranks)
    # rank 3 after the question's 1: RIRS 2 - 16/9 lost; better than the question: 0; lost from rank 2 to
    # nowhere: the whole 2 - 1/9; no gold for the question: nothing to lose; malformed: no opinion
    assert values == pytest.approx([-(2 / 9), 0.0, -(2 - 1 / 9), 0.0, None])


def test_needless_rewrite_costs_a_rewrite_that_does_not_beat_the_question_and_never_a_copy():
    from cqr_lightning.grpo.reward_terms import needless_rewrite_term

    turn = Turn(id="t", history=(), question="When did it open?", positives=("p",))
    rewrites = ["when did it open", "When did the Tokyo Tower open?", "When did the Tokyo Tower open?",
                "When did the Tokyo Tower open?", "When did the tower open?", "When did it open?", None]  # fmt: skip
    ranks = [4, 1, 1, 3, None, 7, None]
    ok = [True, True, True, True, True, True, False]
    question_ranks = [4, 2, 1, 2, None, 1, 1]
    values = needless_rewrite_term(rewrites, ranks, ok, [turn] * 7, question_ranks=question_ranks)
    # a copy (case and punctuation aside) is free even below rank 1; a gain is free; a tie at rank 1, a loss and
    # a miss where the question missed too each cost 1; a copy that somehow ranks worse is still a copy; malformed
    assert values == [0.0, 0.0, -1.0, -1.0, -1.0, 0.0, None]


def test_rewrite_when_solved_costs_only_changing_a_question_that_already_ranks_gold_first():
    from cqr_lightning.grpo.reward_terms import rewrite_when_solved_term

    turn = Turn(id="t", history=(), question="When did the Tokyo Tower open?", positives=("p",))
    longer = "When did the Tokyo Tower in Japan open?"
    rewrites = ["when did the tokyo tower open", longer, longer, "When did it open?", "When did the tower open?", None]
    ranks = [1, 1, 1, None, None, None]
    ok = [True, True, True, True, True, False]
    question_ranks = [1, 1, 2, None, 3, 1]
    values = rewrite_when_solved_term(rewrites, ranks, ok, [turn] * 6, question_ranks=question_ranks)
    # a copy of a solved question is free; changing it costs 1 even when gold stays first; on turns the question
    # does not solve (rank 2, no gold, rank 3) nothing is charged, a miss included; malformed: no opinion
    assert values == [0.0, -1.0, 0.0, 0.0, 0.0, None]


def test_scorer_searches_each_question_once_for_the_relative_term(bm25s_cfg, data_cfg):
    from cqr_lightning.readers import read_jsonl_turns

    turns = list(read_jsonl_turns(f"{data_cfg.dir}/dev.jsonl"))
    relative = [{"name": "below_question", "weight": 1.0}, {"name": "needless_rewrite", "weight": 0.25}]
    relative += [{"name": "rewrite_when_solved", "weight": 0.5}]
    terms = weighted_terms([*SPEC_REWARD, *relative])
    with open_retriever(bm25s_cfg, data_cfg.corpus, show_progress=False) as retriever:
        scorer = RetrievalScorer(retriever, rewards=terms, response_format="rewrite_only")
        asked = retriever.best_gold_ranks([t.question for t in turns], [t.positives for t in turns])
        assert scorer.question_ranks(turns) == asked
        responses = [f"<rewrite> {t.question} </rewrite>" for t in turns]  # copies: never below the question
        batch = scorer.score(turns, responses)
        spec_only = RetrievalScorer(retriever, response_format="rewrite_only")
        spec_only.score(turns, responses)
    assert batch.terms["below_question"] == [0.0] * len(turns)
    assert batch.terms["needless_rewrite"] == [0.0] * len(turns)
    with open_retriever(bm25s_cfg, data_cfg.corpus, show_progress=False) as retriever:
        scorer = RetrievalScorer(retriever, rewards=terms, response_format="rewrite_only")
        off_topic = scorer.score(turns, ["<rewrite> a completely unrelated zebra query </rewrite>"] * len(turns))
    gained = [r is not None and r < 100 and (q is None or r < q) for r, q in zip(off_topic.ranks, asked, strict=True)]
    assert not all(gained)
    assert off_topic.terms["needless_rewrite"] == [0.0 if g else -1.0 for g in gained]
    assert batch.terms["rewrite_when_solved"] == [0.0] * len(turns)  # copies
    solved = [q == 1 for q in asked]  # every dev question of the fixture; the other side is tested above
    assert off_topic.terms["rewrite_when_solved"] == [-1.0 if s else 0.0 for s in solved]
    assert spec_only._question_ranks == {}, "no term names question_ranks: the questions are not searched"
    assert batch.rewards == pytest.approx([rank_incentive_reward(r, True) for r in asked])


def test_leave_one_out_pays_each_rewrite_what_its_group_loses_without_it():
    from cqr_lightning.grpo.reward_terms import leave_one_out_term
    from cqr_lightning.grpo.rewards import mrr3_reward
    from cqr_lightning.retrieval.base import SearchHit
    from cqr_lightning.search import score_sum_fusion

    def ranking(*scored):
        return [SearchHit(pid, score) for pid, score in scored]

    t, u = (
        Turn(id="t", history=(), question="q", positives=("g",)),
        Turn(id="u", history=(), question="q", positives=("h",)),
    )
    rankings = [
        ranking(("g", 5.0), ("a", 1.5)),  # brings g up
        ranking(("a", 4.0), ("b", 3.0)),  # pushes a and b above it
        ranking(("a", 2.0), ("b", 1.5), ("g", 1.0)),  # g third
        None,  # malformed
        ranking(("h", 2.0)),  # the only rewrite of turn u
    ]
    ok = [True, True, True, False, True]
    values = leave_one_out_term(mrr3_reward)(
        [None] * 5, [None] * 5, ok, [t, t, t, t, u], rankings=rankings, combine=score_sum_fusion,
        question_ranks=[3, 3, 3, 3, None],
    )  # fmt: skip
    # summed, the three put g second (g 6.0, a 7.5); without the first g is third, without the second first, without
    # the third second; turn u's lone rewrite against its question's ranking (no gold: 0)
    assert values == pytest.approx([1 / 2 - 1 / 3, 1 / 2 - 1, 0.0, None, 1.0])


def test_leave_one_out_combines_a_group_as_the_rewriter_is_searched_at_inference(bm25s_cfg, data_cfg):
    terms = weighted_terms([{"name": "loo_rank_incentive", "weight": 1.0}])
    shape = rank_incentive_reward
    opening = [{"role": "user", "text": "What is the capital of Japan?"}, {"role": "assistant", "text": "Tokyo."}]
    later = Turn(id="tower", history=tuple(opening), question="What about its height?", positives=("tokyo-2",))
    first = Turn(id="first", history=(), question="When did the Tokyo Tower open?", positives=("tokyo-2",))
    rewrites = ["Tokyo Tower lattice", "What about its height?", "piano keys white and black", "Japan population"]
    responses = [f"<rewrite> {r} </rewrite>" for r in rewrites] + ["no tags"]
    plan = SearchPlan(query_mode="question_rewrite")
    with open_retriever(bm25s_cfg, data_cfg.corpus, show_progress=False) as retriever:
        scorer = RetrievalScorer(retriever, plan, rewards=terms, response_format="rewrite_only")
        batch = scorer.score([later] * 5 + [first] * 2, responses + responses[:2])

        def inference_value(group):  # the rank the rewriter's rewrites of the turn get when evaluated together
            (result,) = scorer.evaluate([later], [tuple(group)] if group else [None])
            return shape(result.best_rank, True)

        whole = inference_value(rewrites)
        expected = [whole - inference_value(rewrites[:i] + rewrites[i + 1 :]) for i in range(4)]
    values = batch.terms["loo_rank_incentive"]
    assert values[:4] == pytest.approx(expected)
    assert any(v != 0 for v in expected)  # the group's rewrites do not all weigh the same
    assert values[4] is None  # malformed: not searched, no opinion
    assert values[5:] == [0.0, 0.0]  # a first turn is searched as asked whatever is written: nothing to add
