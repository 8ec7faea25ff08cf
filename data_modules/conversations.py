"""Stream conversation turns lazily, shuffled through a bounded buffer, resumable mid-epoch.

A training stream is deterministic for a seed: epoch e is shuffled with `Random(seed + e)`, so a
resumed run replays the same order and skips the turns it had already trained on.  Each batch
carries the stream position reached after it; `callbacks.StreamPositionCallback` records the
position of the last batch actually trained on (Lightning prefetches one batch ahead, so the
stream's own counter would run one batch early).

Under DDP each process reads the whole stream and keeps its share (`Shard`): the stream is cut into windows of
`block x count` items and process r keeps the r-th block of each window, so one window is one global batch, the
processes together see every item once, and the global batch of a step holds the same items as on one process.
"""

from __future__ import annotations

import functools
import itertools
import random
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import lightning as L
from torch.utils.data import DataLoader, IterableDataset

from cqr_lightning.errors import DataError
from cqr_lightning.readers import turn_reader, validation_split
from cqr_lightning.records import Turn
from cqr_lightning.retrieval.corpus import read_corpus


@dataclass(frozen=True)
class StreamPosition:
    epoch: int
    consumed: int  # turns of this epoch already yielded


@dataclass(frozen=True)
class Shard:
    """Process `rank` of `count` keeps the `rank`-th block of `block` items of every window of `block x count`.

    With `drop_incomplete` a last window too short to give every process a full block is left out (training:
    every process must take the same number of steps); otherwise its items are shared out as far as they go.
    """

    rank: int
    count: int
    block: int
    drop_incomplete: bool = False

    @property
    def window(self) -> int:
        return self.block * self.count

    def keeps(self, offset: int) -> bool:
        """Whether the item at `offset` within its window is this process's."""
        return offset // self.block == self.rank


class TurnBatch:
    """Turns (or other records) of one batch, their indices in the stream's epoch and the position after it.

    A plain class on purpose: Lightning moves dataclass batches to the device field by field, which
    fails on frozen records; text batches need no moving.
    """

    def __init__(self, turns: list, position: StreamPosition, indices: list[int] | None = None):
        self.turns = turns
        self.position = position
        self.indices = indices if indices is not None else list(range(len(turns)))

    def __len__(self) -> int:
        return len(self.turns)


def shuffle_buffered(items: Iterable, buffer_size: int, rng: random.Random) -> Iterator:
    """Approximate shuffle keeping at most `buffer_size` items in memory."""
    buffer: list = []
    for item in items:
        if len(buffer) < buffer_size:
            buffer.append(item)
            continue
        index = rng.randrange(buffer_size)
        yield buffer[index]
        buffer[index] = item
    rng.shuffle(buffer)
    yield from buffer


class TurnStream(IterableDataset):
    """An iterable over turns that remembers where it is (epoch, turns consumed).

    A `resumable` stream (training) starts each pass where the last one stopped, so a pass cut short, or a position
    loaded from a checkpoint, continues with the next turn. Any other stream (validation, prediction) starts every
    pass at its first turn: a pass abandoned half-way (Lightning prefetches a batch when it fast-forwards over a
    validation on resume; a SIGTERM stops validation between batches) must not shorten the next one."""

    def __init__(
        self,
        make_turns: Callable[[], Iterator[Turn]],
        shuffle_buffer: int = 0,
        seed: int = 0,
        limit: int | None = None,
        shard: Shard | None = None,
        resumable: bool = False,
    ):
        self.make_turns = make_turns
        self.resumable = resumable
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed
        self.limit = limit
        self.shard = shard
        self.position = StreamPosition(epoch=0, consumed=0)

    def __iter__(self) -> Iterator[tuple[Turn, StreamPosition, int]]:
        """(item, position after it, its index in the epoch); with a shard, the position after its window."""
        if not self.resumable:
            self.position = StreamPosition(epoch=0, consumed=0)
        epoch, skip = self.position.epoch, self.position.consumed
        turns = self.make_turns()
        if self.limit is not None:
            turns = itertools.islice(turns, self.limit)
        if self.shuffle_buffer > 1:
            turns = shuffle_buffered(turns, self.shuffle_buffer, random.Random(self.seed + epoch))
        indexed = ((index, turn) for index, turn in enumerate(turns) if index >= skip)
        if self.shard is None:
            for index, turn in indexed:
                self.position = StreamPosition(epoch, index + 1)
                yield turn, self.position, index
        else:
            yield from self._shared(indexed, epoch)
        self.position = StreamPosition(epoch + 1, 0)

    def _shared(self, indexed: Iterator[tuple[int, Turn]], epoch: int):
        shard = self.shard
        window: list[tuple[int, Turn]] = []
        for index, turn in indexed:
            window.append((index, turn))
            if len(window) == shard.window:
                yield from self._keep(window, epoch)
                window = []
        if window and not shard.drop_incomplete:
            yield from self._keep(window, epoch)

    def _keep(self, window: list[tuple[int, Turn]], epoch: int):
        end = StreamPosition(epoch, window[-1][0] + 1)
        for index, turn in window:
            if self.shard.keeps(index - window[0][0]):
                self.position = end
                yield turn, end, index


def collate_turns(items: list[tuple[Turn, StreamPosition, int]]) -> TurnBatch:
    return TurnBatch([turn for turn, _, _ in items], items[-1][1], [index for _, _, index in items])


def read_corpus_ids(path: str | Path) -> frozenset[str]:
    """The passage ids of a corpus, every line checked (cqr_lightning/retrieval/corpus.py); the last corpus read
    is remembered while its file is unchanged, so the pre-flight check and the data module read it once."""
    path = Path(path)
    if not path.is_file():
        raise DataError(path, "corpus file not found")
    stat = path.stat()
    return _corpus_ids(str(path.resolve()), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=1)
def _corpus_ids(path: str, size: int, mtime_ns: int) -> frozenset[str]:
    return frozenset(passage.id for passage in read_corpus(path))


class ConversationDataModule(L.LightningDataModule):
    """Train/val/predict streams over the splits named by a `data` config.

    `batch_size` is the training batch of one process (under DDP, the global batch divided by the processes);
    `eval_batch_size` the validation and sampling batch of one process.
    """

    def __init__(
        self,
        data_cfg,
        batch_size: int = 4,
        eval_batch_size: int = 16,
        train_limit: int | None = None,
        val_limit: int | None = None,
        check_positives: bool = True,
        skip_train_ids: frozenset[str] = frozenset(),
    ):
        super().__init__()
        self.data_cfg = data_cfg
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.train_limit = train_limit
        self.val_limit = val_limit
        self.check_positives = check_positives
        self.skip_train_ids = frozenset(skip_train_ids)  # turns left out of training (not of validation)
        self.train_position = StreamPosition(0, 0)
        self._known_ids: frozenset[str] | None = None
        self._train_stream: TurnStream | None = None

    def known_ids(self) -> frozenset[str] | None:
        if self.check_positives and self._known_ids is None and self.data_cfg.get("corpus"):
            self._known_ids = read_corpus_ids(self.data_cfg.corpus)
        return self._known_ids

    def ordered_stream(self, split: str, limit: int | None) -> TurnStream:
        return TurnStream(turn_reader(self.data_cfg, split, self.known_ids()), limit=limit)

    def _loader(self, stream: TurnStream, batch_size: int, training: bool = False) -> DataLoader:
        """Batches of `batch_size` items; under DDP, of this process's share of the stream (module docstring)."""
        trainer = self.trainer
        if trainer is not None and trainer.world_size > 1:
            stream.shard = Shard(trainer.global_rank, trainer.world_size, batch_size, drop_incomplete=training)
        return DataLoader(stream, batch_size=batch_size, collate_fn=collate_turns, num_workers=0)

    def train_items(self) -> Callable[[], Iterator]:
        """Factory of the training items (turns here, less `skip_train_ids`; subclasses stream other records)."""
        turns = turn_reader(self.data_cfg, self.data_cfg.train_split, self.known_ids())
        if not self.skip_train_ids:
            return turns
        return lambda: (turn for turn in turns() if turn.id not in self.skip_train_ids)

    def train_dataloader(self) -> DataLoader:
        self._train_stream = TurnStream(
            self.train_items(),
            shuffle_buffer=int(self.data_cfg.get("shuffle_buffer", 0)),
            seed=int(self.data_cfg.get("seed", 0)),
            limit=self.train_limit,
            resumable=True,
        )
        self._train_stream.position = self.train_position
        return self._loader(self._train_stream, self.batch_size, training=True)

    def val_dataloader(self) -> DataLoader:
        split = validation_split(self.data_cfg)
        return self._loader(self.ordered_stream(split, self.val_limit), self.eval_batch_size)

    def predict_dataloader(self) -> DataLoader:
        """Training turns in file order, for sampling rewrites (warm-up self-distillation)."""
        return self._loader(self.ordered_stream(self.data_cfg.train_split, self.train_limit), self.eval_batch_size)

    def state_dict(self) -> dict:
        return {"epoch": self.train_position.epoch, "consumed": self.train_position.consumed}

    def load_state_dict(self, state: dict) -> None:
        self.train_position = StreamPosition(int(state["epoch"]), int(state["consumed"]))
