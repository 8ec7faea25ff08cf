"""Keep the adapter with the best validation metric (dev MRR@3 by default) in `<dirpath>/best_adapter`."""

from __future__ import annotations

from pathlib import Path

import lightning as L

from cqr_lightning.io_utils import write_json


class BestAdapterCallback(L.Callback):
    def __init__(self, dirpath: str, monitor: str = "val/mrr_at_3", tokenizer=None, card: dict | None = None):
        self.dirpath = Path(dirpath)
        self.monitor = monitor
        self.tokenizer = tokenizer  # saved beside the weights, with the card (cqr_rewriter.json), when given
        self.card = card
        self.best: float | None = None

    @property
    def path(self) -> Path:
        return self.dirpath / "best_adapter"

    def on_validation_end(self, trainer: L.Trainer, pl_module) -> None:
        if trainer.sanity_checking or self.monitor not in trainer.callback_metrics:
            return
        value = float(trainer.callback_metrics[self.monitor])
        if self.best is None or value > self.best:
            from cqr_lightning.models.loading import save_adapter

            self.best = value  # on every process (it is the same there), so each resumes with it
            if not trainer.is_global_zero:  # under DDP the main process writes the files
                return
            save_adapter(pl_module.policy, self.path, tokenizer=self.tokenizer, card=self.card)
            write_json(self.dirpath / "best_adapter.json", {self.monitor: value, "step": trainer.global_step})

    def state_dict(self) -> dict:
        return {"best": self.best}

    def load_state_dict(self, state: dict) -> None:
        self.best = state.get("best")
