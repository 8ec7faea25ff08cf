"""The one record type every reader produces: a conversational search turn."""

from __future__ import annotations

from dataclasses import dataclass, field

USER = "user"
ASSISTANT = "assistant"


@dataclass(frozen=True)
class Utterance:
    role: str  # "user" or "assistant"
    text: str


@dataclass(frozen=True)
class Turn:
    """One question of a conversation, with everything said before it."""

    id: str
    history: tuple[Utterance, ...]
    question: str
    positives: tuple[str, ...]
    rewrite: str | None = None
    answer: str | None = None
    source: str | None = None
    extra: dict = field(default_factory=dict, compare=False)

    def to_json(self) -> dict:
        return {
            "id": self.id,
            "source": self.source,
            "history": [{"role": u.role, "text": u.text} for u in self.history],
            "question": self.question,
            "positives": list(self.positives),
            "rewrite": self.rewrite,
            "answer": self.answer,
        }
