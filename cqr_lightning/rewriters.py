"""Ways of turning a conversational turn into a search query (`rewriter=` in the configs)."""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cqr_lightning.errors import ConfigError, DataError
from cqr_lightning.formatting import lenient_rewrite, parse_response, response_prefix
from cqr_lightning.prompts import REWRITE_ONLY, THINK_REWRITE, render_prompt
from cqr_lightning.readers import iter_jsonl_objects
from cqr_lightning.records import Turn


@dataclass(frozen=True)
class Rewrite:
    query: str
    response: str | None = None  # the model's full response, for model rewriters
    format_ok: bool | None = None
    samples: tuple[str, ...] = ()  # further sampled rewrites (rewriter.num_samples > 1), searched beside `query`

    @property
    def searched(self) -> str | tuple[str, ...]:
        """What the search plan gets for the turn: the rewrite, or the rewrite and its samples."""
        return (self.query, *self.samples) if self.samples else self.query


class RawRewriter:
    """The question as asked."""

    def __call__(self, turns: Sequence[Turn]) -> list[Rewrite]:
        return [Rewrite(turn.question) for turn in turns]


class HistoryRewriter:
    """The conversation so far (utterances of the chosen roles), then the question."""

    def __init__(self, roles: Sequence[str] = ("user",)):
        self.roles = tuple(roles)

    def __call__(self, turns: Sequence[Turn]) -> list[Rewrite]:
        return [
            Rewrite(" ".join([*(u.text for u in turn.history if u.role in self.roles), turn.question]))
            for turn in turns
        ]


class MissingHumanRewrites(ConfigError):
    """rewriter=human on turns that carry no human rewrite."""


class HumanRewriter:
    """The human rewrite shipped with the data."""

    def __call__(self, turns: Sequence[Turn]) -> list[Rewrite]:
        missing = [turn.id for turn in turns if not turn.rewrite]
        if missing:
            raise MissingHumanRewrites(
                f"rewriter=human needs a human rewrite for every turn, but {len(missing)} turn(s) have none "
                f"(first: {missing[0]}); use rewriter=raw, history or model for this data"
            )
        return [Rewrite(turn.rewrite) for turn in turns]


class FileRewriter:
    """Rewrites saved earlier, one JSON object per line with `id` and `rewrite` (or `query`), and optionally
    `samples` (a list of further rewrites), as in an evaluation's rewrites.jsonl: scores another model's rewrites,
    or the same rewrites against another retriever or under another `search.query_mode`, without generating. A
    null rewrite searches the question."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.queries = read_saved_queries(self.path)

    def __call__(self, turns: Sequence[Turn]) -> list[Rewrite]:
        missing = [turn.id for turn in turns if turn.id not in self.queries]
        if missing:
            raise DataError(self.path, f"no query for {len(missing)} evaluated turn(s) (first: {missing[0]})")
        rewrites = []
        for turn in turns:
            query, samples = self.queries[turn.id]
            rewrites.append(Rewrite(query or turn.question, samples=samples))
        return rewrites


def read_saved_queries(path: Path) -> dict[str, tuple[str | None, tuple[str, ...]]]:
    """{turn id: (rewrite or None, further sampled rewrites)} from a rewrites file."""
    if not path.is_file():
        raise ConfigError(f"rewriter.path: no file at {path}")
    queries: dict[str, tuple[str | None, tuple[str, ...]]] = {}
    for number, row in iter_jsonl_objects(path):
        # an evaluation's file holds the rewrite and what was searched; re-scoring searches the rewrite anew
        query = row.get("rewrite") if "rewrite" in row else row.get("query")
        readable = isinstance(query, str) or (query is None and "rewrite" in row)
        if not isinstance(row.get("id"), str) or not readable:
            raise DataError(path, 'expected an object with string "id" and "rewrite" or "query"', number)
        samples = row.get("samples") or []
        if not isinstance(samples, list) or not all(isinstance(s, str) for s in samples):
            raise DataError(path, '"samples", when present, must be a list of strings', number)
        queries[row["id"]] = (query, tuple(samples))
    return queries


def check_sampling(num_samples: int, temperature: float, prefix: str = "rewriter") -> None:
    """`<prefix>.num_samples` and `<prefix>.temperature` are usable (ConfigError naming them if not)."""
    if num_samples < 1 or temperature <= 0:
        raise ConfigError(
            f"{prefix}.num_samples must be >= 1 and {prefix}.temperature > 0, got {num_samples} and {temperature}"
        )


class ModelRewriter:
    """A causal LM (optionally with a LoRA adapter) writing `<think>..</think>\\n<rewrite>..</rewrite>`.

    When the response holds no rewrite the raw question is used as the query, and the turn counts
    as a format failure.

    For an untuned small model, `prefill` starts every response with the format's opening tag and
    `lenient` (rewrite_only) reads the rewrite from broken tags, as the warm-up's sampling does; the
    response is then still counted as a format failure unless it is well-formed.

    With `num_samples` > 1 the greedy rewrite is joined by `num_samples - 1` rewrites sampled at `temperature`
    (`Rewrite.samples`; a sample without a readable rewrite stands for the question), reproducibly from `seed`;
    the search plan searches them all and sums their rankings. `format_ok` and the response are the greedy one's.
    With `shared_prefill` the samples are drawn by the package's decoding loop, each prompt prefilled once for all
    its samples instead of once per sample (the same distribution, other random numbers).
    """

    def __init__(
        self,
        model,
        tokenizer,
        max_prompt_length: int = 1536,
        max_new_tokens: int = 256,
        batch_size: int = 8,
        response_format: str = THINK_REWRITE,
        few_shot: bool = False,
        prefill: bool = False,
        lenient: bool = False,
        num_samples: int = 1,
        temperature: float = 1.0,
        seed: int = 0,
        shared_prefill: bool = False,
    ):
        if lenient and response_format != REWRITE_ONLY:
            raise ConfigError("rewriter.lenient_format works with rewriter.response_format=rewrite_only only")
        check_sampling(num_samples, temperature)
        self.num_samples = num_samples
        self.temperature = temperature
        self.shared_prefill = shared_prefill
        self._call_seeds = random.Random(seed)  # each call samples from its own seed drawn from `seed`'s stream
        self.prefill = response_prefix(response_format) if prefill else ""
        self.lenient = lenient
        self.model = model
        self.tokenizer = tokenizer
        self.max_prompt_length = max_prompt_length
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size
        self.response_format = response_format
        self.few_shot = few_shot

    def prompts(self, turns: Sequence[Turn]) -> list[str]:
        return [
            render_prompt(self.tokenizer, t, self.max_prompt_length, self.few_shot, self.response_format) + self.prefill
            for t in turns
        ]

    def __call__(self, turns: Sequence[Turn]) -> list[Rewrite]:
        from cqr_lightning.memory_errors import out_of_memory_named
        from cqr_lightning.models.generation import generate, texts_by_prompt

        prompts = self.prompts(turns)
        with out_of_memory_named("rewriter", "rewriting", self.memory_hints):
            greedy = generate(
                self.model, self.tokenizer, prompts, max_new_tokens=self.max_new_tokens, batch_size=self.batch_size
            )
        extra: list[tuple[str, ...]] = [()] * len(turns)
        if self.num_samples > 1:
            n = self.num_samples - 1
            # the loop pads each batch to its longest prompt (a static cache of at least 0 positions: as needed)
            loop = {"decode_loop": True, "static_cache_width": 0} if self.shared_prefill else {}
            with out_of_memory_named("rewriter", "sampling further rewrites", self.memory_hints):
                sampled = generate(
                    self.model,
                    self.tokenizer,
                    prompts,
                    max_new_tokens=self.max_new_tokens,
                    do_sample=True,
                    temperature=self.temperature,
                    num_return_sequences=n,
                    batch_size=max(1, self.batch_size // n),  # about batch_size sequences a call, as the greedy call
                    seed=self._call_seeds.getrandbits(62),
                    **loop,
                )
            per_turn = texts_by_prompt(sampled, len(turns))
            extra = [
                tuple(self.read(text)[0] or turn.question for text in texts)
                for turn, texts in zip(turns, per_turn, strict=True)
            ]
        rewrites = []
        for turn, sample, samples in zip(turns, greedy, extra, strict=True):
            rewrite, text, format_ok = self.read(sample.text)
            rewrites.append(Rewrite(rewrite or turn.question, text, format_ok, samples))
        return rewrites

    def memory_hints(self) -> list[str]:
        """The settings that lower rewriting's memory (under train.py's tables they sit under `eval.`)."""
        return [
            f"rewriter.batch_size={self.batch_size} (sequences a generate call holds; eval.rewriter.batch_size in "
            "train.py's tables)",
            f"rewriter.max_new_tokens={self.max_new_tokens}",
            f"model.max_prompt_length={self.max_prompt_length}",
        ]

    def read(self, generated: str) -> tuple[str | None, str, bool]:
        """(the rewrite or None, the full response, whether it is well formed) of one generated continuation."""
        text = self.prefill + generated
        parsed = parse_response(text, self.response_format)
        return parsed.rewrite or (lenient_rewrite(text) if self.lenient else None), text, parsed.format_ok
