"""Self-distillation for the warm-up stage (SPEC.md "Stage 1").

The untuned model rewrites each training turn N times from the few-shot prompt; a sample is kept
when it passes the format check and its rewrite ranks a gold passage at `keep_rank` or better; with
N > 1 only the best kept sample of a turn survives.  The kept (prompt without the few-shot example,
response) pairs are the SFT data.

With `solved_turn_target="question"`, a turn whose question, searched as asked, already ranks a gold passage at
`keep_rank` or better is kept with the question itself as its rewrite: the SFT then teaches leaving a self-contained
question alone instead of paraphrasing it (most samples kept on such turns are paraphrases that the filter cannot
tell from helpful rewrites, since both keep the gold passage first).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass

import lightning as L

from cqr_lightning.distributed import sample_seed
from cqr_lightning.errors import ConfigError
from cqr_lightning.formatting import ParsedResponse, lenient_rewrite, parse_response, response_prefix
from cqr_lightning.memory_errors import out_of_memory_named
from cqr_lightning.models.generation import generate, texts_by_prompt
from cqr_lightning.prompts import REWRITE_ONLY, THINK_REWRITE, format_response, render_prompt
from cqr_lightning.records import Turn
from cqr_lightning.scoring import rank_bucket

SOLVED_TURN_TARGETS = ("sample", "question")


@dataclass(frozen=True)
class DistilledExample:
    turn_id: str
    prompt: str  # chat-rendered, without the few-shot example
    response: str
    rewrite: str
    rank: int

    def to_json(self) -> dict:
        return asdict(self)


def best_sample(ranks: Sequence[int | None], format_ok: Sequence[bool], keep_rank: int) -> int | None:
    """Index of the kept sample: format-valid, gold rank <= keep_rank, best rank first, earliest on ties."""
    pairs = enumerate(zip(ranks, format_ok, strict=True))
    candidates = [(rank, i) for i, (rank, ok) in pairs if ok and rank is not None and rank <= keep_rank]
    return min(candidates)[1] if candidates else None


def distill(
    sampled: Iterable[tuple[Turn, list[str]]],
    best_ranks: Callable[[list[str], list[Turn]], list[int | None]],
    prompt_for: Callable[[Turn], str],
    keep_rank: int = 1,
    response_format: str = THINK_REWRITE,
    lenient: bool = False,
    solved_turn_target: str = "sample",
    question_ranks: Callable[[list[Turn]], list[int | None]] | None = None,
) -> tuple[list[DistilledExample], dict]:
    """Filter sampled responses by retrieval; returns the kept examples and yield statistics.

    `sampled` gives each turn with its N responses; `best_ranks(queries, turns)` is the retriever's
    best gold rank per query; `prompt_for(turn)` renders the SFT prompt (no few-shot example).

    `lenient` (rewrite_only format only) accepts a response whose tags are broken when a rewrite can
    still be read from it (`lenient_rewrite`), and stores the canonical `<rewrite> ... </rewrite>` as
    the SFT target, so the fine-tuned model learns the exact format the RL reward checks.

    `solved_turn_target` ("sample" or "question", module docstring) says what a turn the question alone solves is
    kept with; "question" needs the rewrite_only format (a think_rewrite target would need a thought the model wrote)
    and `question_ranks(turns)`, each turn's best gold rank searched as asked (`RetrievalScorer.question_ranks`).
    """
    if lenient and response_format != REWRITE_ONLY:
        raise ConfigError("warmup.lenient_format works with response_format=rewrite_only only")
    if solved_turn_target not in SOLVED_TURN_TARGETS:
        raise ConfigError(
            f"warmup.solved_turn_target must be one of {', '.join(SOLVED_TURN_TARGETS)}, got {solved_turn_target!r}"
        )
    keep_question = solved_turn_target == "question"
    if keep_question and response_format != REWRITE_ONLY:
        raise ConfigError("warmup.solved_turn_target=question works with response_format=rewrite_only only")
    if keep_question and question_ranks is None:
        raise ValueError("solved_turn_target='question' needs question_ranks")
    kept: list[DistilledExample] = []
    histogram: Counter = Counter()
    turns_seen = samples_seen = format_ok_count = readable_count = question_targets = 0
    for turn, responses in sampled:
        turns_seen += 1
        samples_seen += len(responses)
        parsed = [parse_response(text, response_format) for text in responses]
        format_ok_count += sum(p.format_ok for p in parsed)
        if lenient:
            parsed = [p if p.format_ok else _lenient(text) for p, text in zip(parsed, responses, strict=True)]
        ok = [p.format_ok for p in parsed]
        readable_count += sum(ok)
        ranks: list[int | None] = [None] * len(parsed)
        valid = [i for i, flag in enumerate(ok) if flag]
        if valid:
            found = best_ranks([parsed[i].rewrite for i in valid], [turn] * len(valid))
            for i, rank in zip(valid, found, strict=True):
                ranks[i] = rank
        histogram.update(rank_bucket(r) if flag else "bad_format" for r, flag in zip(ranks, ok, strict=True))
        question_rank = question_ranks([turn])[0] if keep_question else None
        choice = best_sample(ranks, ok, keep_rank)
        if question_rank is not None and question_rank <= keep_rank:
            question_targets += 1
            response = format_response(turn.question, None, response_format)
            kept.append(DistilledExample(turn.id, prompt_for(turn), response, turn.question, question_rank))
        elif choice is not None:
            rewrite = parsed[choice].rewrite
            response = format_response(rewrite, None, response_format) if lenient else responses[choice].strip()
            kept.append(DistilledExample(turn.id, prompt_for(turn), response, rewrite, ranks[choice]))
    stats = {
        "turns": turns_seen,
        "samples": samples_seen,
        "format_ok_rate": format_ok_count / samples_seen if samples_seen else 0.0,
        "readable_rate": readable_count / samples_seen if samples_seen else 0.0,  # with `lenient`
        "kept": len(kept),
        "question_targets": question_targets,  # with solved_turn_target="question": turns kept with their question
        "yield": len(kept) / turns_seen if turns_seen else 0.0,
        "rank_histogram": dict(histogram),
    }
    return kept, stats


def _lenient(text: str) -> ParsedResponse:
    rewrite = lenient_rewrite(text)
    return ParsedResponse(format_ok=rewrite is not None, rewrite=rewrite)


class SampledTurn:
    """A turn and its sampled responses (a plain class: Lightning would try to move dataclasses to the CPU)."""

    __slots__ = ("turn", "responses")

    def __init__(self, turn: Turn, responses: list[str]):
        self.turn = turn
        self.responses = responses

    def __iter__(self):
        return iter((self.turn, self.responses))


class RewriteSampler(L.LightningModule):
    """Samples N few-shot rewrites per turn through Lightning's predict loop (progress bar included).

    Each batch is seeded from `seed` and its first turn's place in the file, so a turn's samples do not depend
    on which DDP process draws them. `predict_step` returns (index in the file, SampledTurn) pairs.
    """

    def __init__(
        self,
        policy,
        tokenizer,
        max_prompt_length: int,
        num_samples: int = 1,
        temperature: float = 0.7,
        top_p: float = 1.0,
        max_new_tokens: int = 256,
        response_format: str = THINK_REWRITE,
        batch_size: int | None = None,
        prefill_response: bool = False,
        seed: int = 0,
    ):
        super().__init__()
        self.prefill = response_prefix(response_format) if prefill_response else ""
        self.policy = policy
        self.tokenizer = tokenizer
        self.max_prompt_length = max_prompt_length
        self.num_samples = num_samples
        self.temperature = temperature
        self.top_p = top_p
        self.max_new_tokens = max_new_tokens
        self.response_format = response_format
        self.batch_size = batch_size
        self.seed = seed

    def memory_hints(self, turns_per_call: int) -> list[str]:
        """The settings that lower the sampling's memory, with their values in this run."""
        return [
            f"warmup.sampling_batch_size={turns_per_call} (turns per generate call, each sampled warmup.num_samples="
            f"{self.num_samples} times)",
            f"warmup.max_new_tokens={self.max_new_tokens}",
            f"model.max_prompt_length={self.max_prompt_length}",
        ]

    def predict_step(self, batch, batch_idx: int) -> list[SampledTurn]:
        turns = batch.turns
        fmt = self.response_format
        prompts = [render_prompt(self.tokenizer, t, self.max_prompt_length, True, fmt) + self.prefill for t in turns]
        with out_of_memory_named("warmup", "self-distillation sampling", lambda: self.memory_hints(len(turns))):
            samples = generate(
                self.policy,
                self.tokenizer,
                prompts,
                max_new_tokens=self.max_new_tokens,
                do_sample=True,
                temperature=self.temperature,
                top_p=self.top_p,
                num_return_sequences=self.num_samples,
                batch_size=self.batch_size,
                seed=sample_seed(self.seed, 0, batch.indices[0]),
            )
        responses = [[self.prefill + text for text in texts] for texts in texts_by_prompt(samples, len(turns))]
        pairs = zip(batch.indices, turns, responses, strict=True)
        return [(index, SampledTurn(turn, texts)) for index, turn, texts in pairs]
