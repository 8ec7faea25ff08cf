"""Prompt layout, truncation from the oldest exchange, and the response format check."""

from __future__ import annotations

import logging
import time

import pytest

from cqr_lightning.errors import ConfigError
from cqr_lightning.formatting import parse_response
from cqr_lightning.models.tiny import build_tiny_tokenizer
from cqr_lightning.prompts import REWRITE_ONLY, format_context, render_prompt, user_message
from cqr_lightning.records import Turn, Utterance


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()


def make_turn(n_exchanges: int, answers: bool = True) -> Turn:
    history = []
    for i in range(1, n_exchanges + 1):
        history.append(Utterance("user", f"question number {i} about the river"))
        if answers:
            history.append(Utterance("assistant", f"answer number {i} about the river bank"))
    return Turn(id="t", history=tuple(history), question="how long is it?", positives=("p",))


def test_context_block_numbers_questions_and_answers():
    block = format_context(make_turn(2).history)
    assert block.splitlines() == [
        "### Context Begin ###",
        "Q1: question number 1 about the river",
        "A1: answer number 1 about the river bank",
        "Q2: question number 2 about the river",
        "A2: answer number 2 about the river bank",
        "### Context End ###",
    ]


def test_history_without_answers_lists_questions_only():
    assert "A1:" not in format_context(make_turn(3, answers=False).history)


def test_message_ends_with_query_and_rewrite_cue():
    message = user_message(make_turn(1).history, "how long is it?")
    assert message.endswith("### Context End ###\n\nQuery: how long is it?\nRewrite:")
    assert "<think>" in message and "<rewrite>" in message


def test_few_shot_adds_one_worked_example():
    plain = user_message((), "q")
    few = user_message((), "q", few_shot=True)
    assert few.count("### Context Begin ###") == plain.count("### Context Begin ###") + 1
    assert "<rewrite> How old was Mary Shelley" in few


def test_render_uses_chat_template(tokenizer):
    text = render_prompt(tokenizer, make_turn(1), max_prompt_length=10_000)
    expected = tokenizer.apply_chat_template(
        [{"role": "user", "content": user_message(make_turn(1).history, "how long is it?")}],
        tokenize=False,
        add_generation_prompt=True,
    )
    assert text == expected


def test_truncation_drops_oldest_exchanges_first(tokenizer):
    turn = make_turn(8)
    full = render_prompt(tokenizer, turn, max_prompt_length=100_000)
    full_len = len(tokenizer(full, add_special_tokens=False)["input_ids"])
    budget = full_len - 20
    cut = render_prompt(tokenizer, turn, max_prompt_length=budget)
    assert len(tokenizer(cut, add_special_tokens=False)["input_ids"]) <= budget
    assert "question number 1 about" not in cut
    assert "question number 8 about" in cut and "answer number 8" in cut
    kept = [i for i in range(1, 9) if f"question number {i} about" in cut]
    assert kept == list(range(kept[0], 9)), "a contiguous suffix of the history is kept"
    assert "Q1: question number" in cut, "numbering restarts at the first kept question"


def token_count(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def test_truncation_keeps_question_when_nothing_else_fits(tokenizer):
    bare = render_prompt(tokenizer, make_turn(0), max_prompt_length=100_000)
    cut = render_prompt(tokenizer, make_turn(8), max_prompt_length=token_count(tokenizer, bare))
    assert cut == bare
    assert "Query: how long is it?" in cut and "question number" not in cut


def test_a_budget_below_the_instructions_names_the_setting(tokenizer):
    with pytest.raises(ConfigError, match="model.max_prompt_length=5 is too small"):
        render_prompt(tokenizer, make_turn(8), max_prompt_length=5)


@pytest.mark.parametrize("few_shot", [False, True])
def test_a_5_mb_question_is_cut_to_its_start_with_a_warning_naming_the_turn(tokenizer, caplog, few_shot):
    question = "where does the river that flows past the old mill begin and end? " * 80_000
    assert len(question.encode()) > 5_000_000
    turn = Turn(id="huge_7", history=make_turn(3).history, question=question, positives=("p",))
    started = time.perf_counter()
    with caplog.at_level(logging.WARNING, logger="cqr_lightning.prompts"):
        text = render_prompt(tokenizer, turn, max_prompt_length=600, few_shot=few_shot)
    assert time.perf_counter() - started < 5, "only a head of the question is tokenised"
    assert token_count(tokenizer, text) <= 600
    assert "question number" not in text, "no room is left for history"
    asked = text.split("Query: ")[-1].split("\nRewrite:")[0]
    assert len(asked) > 100 and question.startswith(asked)
    assert "\nRewrite:" in text.split("Query: ")[-1], "the cue after the question is kept"
    (warning,) = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert "turn huge_7" in warning.getMessage() and "model.max_prompt_length=600" in warning.getMessage()


def test_non_ascii_question_is_cut_on_a_character_boundary(tokenizer):
    turn = Turn(id="x", history=(), question="größter Fluss 最长的河流 " * 2_000, positives=("p",))
    text = render_prompt(tokenizer, turn, max_prompt_length=300)
    assert token_count(tokenizer, text) <= 300 and "\ufffd" not in text
    asked = text.split("Query: ")[-1].split("\nRewrite:")[0]
    assert turn.question.startswith(asked)


def test_a_question_that_fits_is_not_cut_and_no_warning_is_logged(tokenizer, caplog):
    with caplog.at_level(logging.WARNING, logger="cqr_lightning.prompts"):
        text = render_prompt(tokenizer, make_turn(2), max_prompt_length=100_000)
    assert "Query: how long is it?\nRewrite:" in text and not caplog.records


@pytest.mark.parametrize(
    ("text", "ok", "rewrite"),
    [
        ("<think> it is the Nile </think>\n<rewrite> how long is the Nile? </rewrite>", True, "how long is the Nile?"),
        ("<think> a </think><rewrite> b </rewrite>", False, "b"),
        ("<think> a </think>\n<rewrite> b </rewrite> trailing", False, "b"),
        ("<rewrite> b </rewrite>", False, "b"),
        ("<think> a </think>\n<rewrite>  </rewrite>", False, None),
        ("no tags at all", False, None),
        ("<think> multi\nline </think>\n<rewrite> b </rewrite>", True, "b"),
    ],
)
def test_format_check(text, ok, rewrite):
    parsed = parse_response(text)
    assert (parsed.format_ok, parsed.rewrite) == (ok, rewrite)


def test_rewrite_only_format():
    assert parse_response("<rewrite> b </rewrite>", REWRITE_ONLY).format_ok
    assert not parse_response("<think> a </think>\n<rewrite> b </rewrite>", REWRITE_ONLY).format_ok


def test_a_copy_is_the_question_word_for_word_whatever_the_case_and_punctuation():
    from cqr_lightning.formatting import is_copy

    assert is_copy("when did he die", "When did he die?")
    assert is_copy("When  did he\ndie ?", "When did he die?")
    assert not is_copy("When did Ayrton Senna die?", "When did he die?")
    assert not is_copy("did he die", "When did he die?")
    assert not is_copy(None, "When did he die?")
