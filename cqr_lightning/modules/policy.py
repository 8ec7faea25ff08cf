"""What both training stages share: the LoRA policy, retrieval-scored validation, lean checkpoints.

Checkpoints hold only the trainable (LoRA) weights plus optimizer, scheduler, loop, data and RNG
state: never the base model, which is reloaded from its source on resume. Under DDP the main process writes
them and every process restores its RNG state: the processes share it (same seed, same draws; sampling is
seeded per call, cqr_lightning/distributed.py), so the main process's state is every process's.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import lightning as L
import numpy as np
import torch

from cqr_lightning.distributed import gather_objects
from cqr_lightning.evaluation import SHARE_NAMES
from cqr_lightning.formatting import parse_response
from cqr_lightning.memory_errors import out_of_memory_named
from cqr_lightning.metrics import METRIC_NAMES, aggregate_metrics
from cqr_lightning.models.generation import generate
from cqr_lightning.prompts import THINK_REWRITE, render_prompt
from cqr_lightning.records import Turn
from cqr_lightning.tracking import metric_key


def capture_rng_state() -> dict:
    numpy_state = np.random.get_state()
    return {
        "python": list(random.getstate()[1]),
        "python_version": random.getstate()[0],
        "python_gauss": random.getstate()[2],
        "numpy_keys": torch.from_numpy(numpy_state[1].astype(np.int64)),
        "numpy_pos": int(numpy_state[2]),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,  # this process's device
    }


def restore_rng_state(state: dict) -> None:
    random.setstate((state["python_version"], tuple(state["python"]), state["python_gauss"]))
    np.random.set_state(("MT19937", state["numpy_keys"].numpy().astype(np.uint32), state["numpy_pos"], 0, 0.0))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


class PolicyModule(L.LightningModule):
    """Holds `policy` (a peft model) and `tokenizer`; validates greedy rewrites with `scorer`, the
    `RetrievalScorer` that searches them as the training reward does (none: no validation metrics).

    The first validation also searches each turn's question as asked, the baseline a rewriter has to beat:
    `raw_question_metrics` holds its means under the validation keys (`val/mrr_at_3`, ...), for callbacks to
    record; it is computed once per module, since the question does not change with training."""

    stage_name = "policy"  # the config group of the stage's settings (rl, warmup), for error messages

    def __init__(
        self,
        policy,
        tokenizer,
        max_prompt_length: int = 1536,
        max_new_tokens: int = 256,
        response_format: str = THINK_REWRITE,
        val_batch_size: int = 8,
        scorer=None,
    ):
        super().__init__()
        self.policy = policy
        self.tokenizer = tokenizer
        self.max_prompt_length = max_prompt_length
        self.max_new_tokens = max_new_tokens
        self.response_format = response_format
        self.val_batch_size = val_batch_size
        self.scorer = scorer
        self.extras: dict = {}  # run-level values stored with checkpoints (MLflow run id, ...)
        self.strict_loading = False  # checkpoints carry only the LoRA weights
        self._val_results: list[dict[str, float]] = []
        self.raw_question_metrics: dict[str, float] | None = None
        self._raw_rows: list[dict[str, float]] = []
        self._pending_rng: dict | None = None

    def generation_model(self):
        """The model that samples rewrites (the policy itself unless a subclass has a faster copy)."""
        return self.policy

    def prompts(self, turns: Sequence[Turn]) -> list[str]:
        return [render_prompt(self.tokenizer, t, self.max_prompt_length, False, self.response_format) for t in turns]

    # validation: greedy rewrites scored with the retriever
    def on_validation_epoch_start(self) -> None:
        self._val_results = []
        self._raw_rows = []

    def validation_step(self, batch, batch_idx: int) -> None:
        turns = batch.turns
        with out_of_memory_named(self.stage_name, "validation", self.validation_memory_hints):
            samples = generate(
                self.generation_model(),
                self.tokenizer,
                self.prompts(turns),
                max_new_tokens=self.max_new_tokens,
                do_sample=False,
                batch_size=self.val_batch_size,
            )
        parsed = [parse_response(s.text, self.response_format) for s in samples]
        results = self.scorer.evaluate(turns, [p.rewrite for p in parsed])
        for p, result in zip(parsed, results, strict=True):
            if result.metrics:
                shares = {"format_ok": float(p.format_ok), "copy_rate": float(result.as_asked)}
                self._val_results.append({**result.metrics, **shares})
        if self.raw_question_metrics is None:  # the same turns, searched with the question as asked
            self._raw_rows += [r.metrics for r in self.scorer.evaluate(turns, [None] * len(turns)) if r.metrics]

    def validation_memory_hints(self) -> list[str]:
        return [
            f"{self.stage_name}.val_batch_size={self.val_batch_size} (turns a validation generate call holds)",
            f"model.max_prompt_length={self.max_prompt_length}",
        ]

    def on_validation_epoch_end(self) -> None:
        if self.raw_question_metrics is None:
            raw_rows = gather_objects(self._raw_rows)
            if raw_rows:
                raw = aggregate_metrics({str(i): row for i, row in enumerate(raw_rows)})
                self.raw_question_metrics = {metric_key(f"val/{name}"): raw[name] for name in METRIC_NAMES}
        rows = gather_objects(self._val_results)  # under DDP each process validated its share of the turns
        if not rows:
            return
        summary = summarize_rows(rows)
        for name in (*METRIC_NAMES, *SHARE_NAMES):
            key = metric_key(f"val/{name}")  # val/mrr_at_3: '@' is not allowed in MLflow metric names
            self.log(key, summary[name], prog_bar=name == "mrr@3", batch_size=len(rows), sync_dist=True)

    # lean, resumable checkpoints
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        trainable = {name for name, p in self.named_parameters() if p.requires_grad}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}
        checkpoint["cqr_rng"] = capture_rng_state()
        checkpoint["cqr_extras"] = dict(self.extras)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        trainable = {name for name, p in self.named_parameters() if p.requires_grad}
        missing = trainable - set(checkpoint["state_dict"])
        if missing:
            raise ValueError(f"checkpoint lacks {len(missing)} trainable weights (e.g. {sorted(missing)[0]})")
        self._pending_rng = checkpoint.get("cqr_rng")
        self.extras.update(checkpoint.get("cqr_extras", {}))

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        # Restored here, not at load time: Lightning draws random numbers while it sets up the data
        # loaders between the two, which the uninterrupted run did before the checkpoint was taken.
        if self._pending_rng is not None:
            restore_rng_state(self._pending_rng)
            self._pending_rng = None


def summarize_rows(rows: Sequence[dict[str, float]]) -> dict[str, float]:
    """Means of per-turn metric rows (with `format_ok` and `copy_rate`)."""
    summary = aggregate_metrics({str(i): row for i, row in enumerate(rows)})
    for name in SHARE_NAMES:
        summary[name] = sum(r[name] for r in rows) / len(rows)
    return summary
