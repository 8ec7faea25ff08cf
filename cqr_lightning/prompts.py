"""The rewriting prompt: instruction, context block and query, rendered with the chat template.

Layout (SPEC.md "Prompt"): an instruction, then

    ### Context Begin ###
    Q1: ...
    A1: ...
    ### Context End ###

    Query: <current question>
    Rewrite:

sent as the user message.  Histories are cut from the oldest exchange until the rendered prompt
fits `max_prompt_length` tokens; a question too long to fit even alone keeps only its start.
The few-shot variant (warm-up sampling) inserts one worked example of the output format between
the instruction and the context.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from cqr_lightning.errors import ConfigError
from cqr_lightning.records import USER, Turn, Utterance

log = logging.getLogger(__name__)

THINK_REWRITE = "think_rewrite"
REWRITE_ONLY = "rewrite_only"

_TASK = (
    "You turn the last question of a conversation into a stand-alone search query. Resolve every "
    "pronoun, reference and omitted detail using the conversation so far, keep the question's original "
    "intent, and make the query as informative as possible for a search engine."
)
_ANSWER_FORMAT = {
    THINK_REWRITE: (
        "First reason briefly about what the question refers to, then give the query. Reply exactly in "
        "the form <think> your reasoning </think>\n<rewrite> the stand-alone query </rewrite>"
    ),
    REWRITE_ONLY: "Reply exactly in the form <rewrite> the stand-alone query </rewrite>",
}

_EXAMPLE_HISTORY = (
    Utterance("user", "Who wrote the novel Frankenstein?"),
    Utterance("assistant", "Mary Shelley wrote it; it was published in 1818."),
    Utterance("user", "Where was she born?"),
    Utterance("assistant", "She was born in Somers Town, London."),
)
_EXAMPLE_QUESTION = "How old was she when it came out?"
_EXAMPLE_REWRITE = "How old was Mary Shelley when her novel Frankenstein was published in 1818?"
_EXAMPLE_THOUGHT = (
    "'she' is Mary Shelley and 'it' is her novel Frankenstein, which came out in 1818; the user wants her "
    "age at publication."
)


def format_response(rewrite: str, thought: str | None, response_format: str = THINK_REWRITE) -> str:
    """The target text of a response in the project's output format."""
    if response_format == REWRITE_ONLY:
        return f"<rewrite> {rewrite} </rewrite>"
    return f"<think> {thought} </think>\n<rewrite> {rewrite} </rewrite>"


def format_context(history: Sequence[Utterance]) -> str:
    """Q/A numbered lines; answers take the number of the question they follow."""
    lines, number = [], 0
    for utterance in history:
        if utterance.role == USER:
            number += 1
            lines.append(f"Q{number}: {utterance.text}")
        else:
            lines.append(f"A{max(number, 1)}: {utterance.text}")
    return "\n".join(["### Context Begin ###", *lines, "### Context End ###"])


def _query_block(history: Sequence[Utterance], question: str) -> str:
    return f"{format_context(history)}\n\nQuery: {question}\nRewrite:"


def _few_shot_block(response_format: str) -> str:
    example = _query_block(_EXAMPLE_HISTORY, _EXAMPLE_QUESTION)
    response = format_response(_EXAMPLE_REWRITE, _EXAMPLE_THOUGHT, response_format)
    return f"Here is an example.\n\n{example}\n{response}\n\nNow the real task."


def user_message(
    history: Sequence[Utterance], question: str, few_shot: bool = False, response_format: str = THINK_REWRITE
) -> str:
    if response_format not in _ANSWER_FORMAT:
        raise ValueError(f"unknown response_format '{response_format}': use {' or '.join(_ANSWER_FORMAT)}")
    parts = [_TASK, _ANSWER_FORMAT[response_format]]
    if few_shot:
        parts.append(_few_shot_block(response_format))
    parts.append(_query_block(history, question))
    return "\n\n".join(parts)


def exchange_starts(history: Sequence[Utterance]) -> list[int]:
    """Indices where a user utterance opens an exchange (the unit dropped when truncating)."""
    starts = [i for i, u in enumerate(history) if u.role == USER]
    return starts if starts and starts[0] == 0 else [0, *starts]


def render_prompt(
    tokenizer,
    turn: Turn,
    max_prompt_length: int,
    few_shot: bool = False,
    response_format: str = THINK_REWRITE,
) -> str:
    """Chat-rendered prompt text (generation prompt included) that fits `max_prompt_length` tokens.

    The oldest exchanges are dropped first. A question that does not fit even alone is cut to its start, with a
    warning naming the turn; ConfigError when not even the instructions fit."""

    def chat(history: Sequence[Utterance], question: str) -> str:
        return _chat(tokenizer, user_message(history, question, few_shot, response_format))

    overhead = _length(tokenizer, chat((), ""))
    if overhead >= max_prompt_length:
        raise ConfigError(
            f"model.max_prompt_length={max_prompt_length} is too small: the prompt's instructions alone take "
            f"{overhead} tokens"
        )
    keep = max_prompt_length - overhead  # tokens left for the question
    question, cut = question_start(tokenizer, turn.question, keep)
    history = turn.history
    for start in [*(exchange_starts(history) if history else []), len(history)]:
        text = chat(history[start:], question)
        if _length(tokenizer, text) <= max_prompt_length:
            break
    while (excess := _length(tokenizer, text) - max_prompt_length) > 0:  # a cut question re-tokenised in place
        keep -= excess
        if keep <= 0:
            raise ConfigError(f"model.max_prompt_length={max_prompt_length} leaves no room for the question")
        question, cut = question_start(tokenizer, turn.question, keep)[0], True
        text = chat((), question)
    if cut:
        log.warning(
            "turn %s: the question does not fit model.max_prompt_length=%d tokens; kept its first %d of %d characters",
            turn.id,
            max_prompt_length,
            len(question),
            len(turn.question),
        )
    return text


def question_start(tokenizer, question: str, max_tokens: int) -> tuple[str, bool]:
    """The longest start of `question` of at most `max_tokens` tokens, and whether it is shorter than the question.

    Only a head of the question is tokenised, growing until it holds more than `max_tokens` tokens, so a
    question of megabytes costs a few thousand tokens of work."""
    window = 8 * max(max_tokens, 1)
    while True:
        head = question[:window]
        ids = tokenizer(head, add_special_tokens=False)["input_ids"]
        if len(ids) > max_tokens:
            return tokenizer.decode(ids[:max_tokens]).rstrip("\ufffd"), True  # no half of a split character
        if window >= len(question):
            return question, False
        window *= 4


def _length(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def _chat(tokenizer, message: str) -> str:
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": message}], tokenize=False, add_generation_prompt=True
    )
