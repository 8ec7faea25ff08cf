"""Check a generated response's format and take the rewrite out of it (SPEC.md "Output format")."""

from __future__ import annotations

import re
from dataclasses import dataclass

from cqr_lightning.prompts import REWRITE_ONLY, THINK_REWRITE

_FORMATS = {
    THINK_REWRITE: re.compile(r"^<think>.*?</think>\n<rewrite>.*?</rewrite>$", re.DOTALL),
    REWRITE_ONLY: re.compile(r"^<rewrite>.*?</rewrite>$", re.DOTALL),
}
_REWRITE = re.compile(r"<rewrite>(.*?)</rewrite>", re.DOTALL)


@dataclass(frozen=True)
class ParsedResponse:
    format_ok: bool
    rewrite: str | None  # text inside the (last) rewrite tags, stripped; None when absent or empty


def parse_response(text: str, response_format: str = THINK_REWRITE) -> ParsedResponse:
    if response_format not in _FORMATS:
        raise ValueError(f"unknown response_format '{response_format}': use {' or '.join(_FORMATS)}")
    format_ok = bool(_FORMATS[response_format].match(text.strip()))
    found = _REWRITE.findall(text)
    rewrite = found[-1].strip() if found else None
    return ParsedResponse(format_ok=format_ok and bool(rewrite), rewrite=rewrite or None)


_OPEN_TAG = {THINK_REWRITE: "<think>", REWRITE_ONLY: "<rewrite>"}


def response_prefix(response_format: str) -> str:
    """The opening tag that a prefilled response starts with (the model continues after it)."""
    return _OPEN_TAG[response_format]


def is_copy(rewrite: str | None, question: str) -> bool:
    """Whether a rewrite repeats the question word for word, ignoring case, punctuation and spacing.

    The share of copies shows a rewriter that has learnt to leave questions alone (a safe answer for the
    retrieval reward on self-contained turns). No rewrite (None) is not a copy."""
    return rewrite is not None and _words(rewrite) == _words(question)


def _words(text: str) -> list[str]:
    return re.findall(r"\w+", text.casefold())


# Where a small model starts echoing the prompt's layout (prompts.py): "### Context ...", "Query:", "Rewrite:", "Q2:".
_PROMPT_ECHO = re.compile(r"###|\b(?:Query|Rewrite|[QA]\d+):")


def lenient_rewrite(text: str) -> str | None:
    """For small models that write a good rewrite but break the tags: the first line after `<rewrite>`,
    up to any closing or malformed tag or echo of the prompt's layout; None when nothing is left."""
    start = text.find("<rewrite>")
    if start < 0:
        return None
    body = text[start + len("<rewrite>") :].lstrip()
    line = body.split("\n", 1)[0]
    rewrite = _PROMPT_ECHO.split(line.split("</", 1)[0].split("<", 1)[0], maxsplit=1)[0].strip()
    return rewrite or None
