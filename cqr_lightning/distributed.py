"""What the stages need to run as several processes under Lightning's DDP strategy.

Lightning launches the processes (or torchrun / SLURM does) and sets up the process group; these helpers only
answer "am I the process that writes files?", split a global batch, gather Python objects and seed sampling so
that a prompt's samples do not depend on which process draws them.
"""

from __future__ import annotations

import hashlib
import os

import torch.distributed as dist

from cqr_lightning.errors import ConfigError

# environment variables that launchers set to a process's global rank (Lightning's own launcher sets only
# LOCAL_RANK and NODE_RANK for the processes it starts)
GLOBAL_RANK_VARIABLES = ("RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK")


def is_main_process() -> bool:
    """Whether this process is global rank 0, read from the launcher's environment (usable before a Trainer
    exists). A single process, or the process that Lightning's launcher starts first, is the main one."""
    for name in GLOBAL_RANK_VARIABLES:
        if os.environ.get(name) is not None:
            return int(os.environ[name]) == 0
    node = int(os.environ.get("NODE_RANK", os.environ.get("GROUP_RANK", 0)))
    return node == 0 and int(os.environ.get("LOCAL_RANK", 0)) == 0


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def gather_objects(items: list) -> list:
    """Every process's `items` concatenated in rank order (on every process); `items` alone without DDP."""
    if not is_distributed():
        return list(items)
    parts: list = [None] * dist.get_world_size()
    dist.all_gather_object(parts, list(items))
    return [item for part in parts for item in part]


def per_rank_batch(global_batch: int, world_size: int, setting: str) -> int:
    """The share of a global batch each of `world_size` processes takes; ConfigError naming `setting` when the
    global batch does not split evenly."""
    if global_batch % world_size:
        raise ConfigError(
            f"{setting}={global_batch} is the global batch and must be a multiple of the {world_size} processes "
            "(trainer.devices x trainer.num_nodes)"
        )
    return global_batch // world_size


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The seed of a generation call whose first prompt is item `index` of epoch `epoch` of a stream: a prompt's
    samples depend on the run's seed and its place in the stream, not on the process or the step that draws it."""
    digest = hashlib.sha256(f"{seed}:{epoch}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)
