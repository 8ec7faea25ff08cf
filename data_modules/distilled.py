"""The warm-up SFT data: distilled (prompt, response) rows streamed from JSONL; dev turns for validation."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

from cqr_lightning.errors import DataError
from cqr_lightning.readers import iter_jsonl_objects
from data_modules.conversations import ConversationDataModule

REQUIRED_FIELDS = ("turn_id", "prompt", "response")


def read_distilled(path: str | Path) -> Iterator[dict]:
    for line, row in iter_jsonl_objects(path):
        for name in REQUIRED_FIELDS:
            if not isinstance(row.get(name), str) or not row[name]:
                raise DataError(path, f"distilled row lacks a non-empty '{name}'", line)
        yield row


class DistilledDataModule(ConversationDataModule):
    def __init__(self, distilled_path: str | Path, data_cfg, **kwargs):
        super().__init__(data_cfg, **kwargs)
        self.distilled_path = Path(distilled_path)

    def train_items(self) -> Callable[[], Iterator[dict]]:
        return lambda: read_distilled(self.distilled_path)
