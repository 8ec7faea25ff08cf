"""DDP through Lightning's own strategy, on CPU with two gloo processes and the tiny model.

`python train.py ... trainer=ddp trainer.devices=2` runs as a real subprocess (Lightning re-launches the script for
the second process). The same seed and global batch give the adapter one process gives: every generation call is
seeded from its first prompt's place in the stream and `rl.generation_batch_size=1` makes the calls the same in
both runs, so both draw the same samples; the loss is normalised by the global batch. What is left are float
sums taken in another order (two micro-batches reduced by all-reduce instead of one), hence a tolerance of 1e-6
on LoRA weights of order 0.1 (1.9e-9 measured).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_train_e2e import checkpoint_step

from cqr_lightning.distributed import per_rank_batch
from cqr_lightning.errors import ConfigError
from data_modules.conversations import Shard, TurnStream

ROOT = Path(__file__).resolve().parent.parent
STEPS = 4


def shares(count: int, items: int, block: int, drop_incomplete: bool) -> list[list[int]]:
    return [
        [index for _, _, index in TurnStream(lambda: iter(range(items)), shard=Shard(r, count, block, drop_incomplete))]
        for r in range(count)
    ]


def test_a_stream_is_shared_out_in_whole_blocks_of_each_window():
    assert shares(2, 10, 2, False) == [[0, 1, 4, 5, 8, 9], [2, 3, 6, 7]]
    assert shares(2, 10, 2, True) == [[0, 1, 4, 5], [2, 3, 6, 7]]  # training: every process takes as many steps


def test_position_after_a_share_is_the_end_of_its_window_so_resume_skips_whole_global_batches():
    stream = TurnStream(lambda: iter(range(8)), shard=Shard(1, 2, 2, True), resumable=True)  # a training stream
    assert [(index, position.consumed) for _, position, index in stream] == [(2, 4), (3, 4), (6, 8), (7, 8)]
    stream.position = type(stream.position)(0, 4)
    assert [index for _, _, index in stream] == [6, 7]


def test_a_global_batch_that_does_not_split_names_the_setting():
    assert per_rank_batch(8, 2, "rl.batch_size") == 4
    with pytest.raises(ConfigError, match=r"rl.batch_size=3 is the global batch .* multiple of the 2 processes"):
        per_rank_batch(3, 2, "rl.batch_size")


def rl_command(data_dir: Path, run_dir: Path, *extra: str) -> list[str]:
    # float32 arithmetic: on a CPU with native bf16 instructions (AVX512-BF16), a bf16 matmul's rounding depends on
    # how the batch is split, so two processes and one part ways by up to 5e-5 after 4 steps (seen 2026-12-02, the
    # lora_B weights being about 2e-4), while in float32 they agree within 2e-8; the tolerance is about DDP's
    # sharding, all-reduce and loss normalisation, not about bf16 rounding
    return [
        sys.executable, "train.py", "stage=rl", "model=tiny", "model.compute_dtype=float32", "data=jsonl",
        f"data.dir={data_dir}",
        f"run_dir={run_dir}", "logger=none", "trainer.accelerator=cpu", "+trainer.enable_progress_bar=false",
        f"rl.max_steps={STEPS}",
        "rl.batch_size=2", "rl.group_size=2", "rl.max_new_tokens=12", "rl.micro_batch_size=2",
        "rl.generation_batch_size=1", "rl.val_limit=2", "rl.val_every_n_steps=2", "rl.checkpoint_every_n_steps=1",
        *extra,
    ]  # fmt: skip


DDP = ("trainer=ddp", "trainer.devices=2")
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def adapter(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "rl" / "adapter" / "adapter_model.safetensors")


def assert_same_adapter(actual: dict, expected: dict) -> None:
    assert actual.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=0, atol=1e-6)


@pytest.fixture(scope="module")
def one_process_run(fixture_data_dir, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("one") / "run"
    subprocess.run(rl_command(fixture_data_dir, run_dir), cwd=ROOT, env=ENV, check=True, capture_output=True,
                   timeout=600)  # fmt: skip
    return run_dir


@pytest.mark.slow
def test_grpo_on_two_processes_gives_the_adapter_of_one_process(fixture_data_dir, one_process_run, tmp_path):
    run_dir = tmp_path / "ddp"
    result = subprocess.run(rl_command(fixture_data_dir, run_dir, *DDP), cwd=ROOT, env=ENV, capture_output=True,
                            text=True, timeout=600)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Starting with 2 processes" in result.stdout + result.stderr
    assert_same_adapter(adapter(run_dir), adapter(one_process_run))
    curves = (run_dir / "rl" / "curves.csv").read_text().splitlines()
    assert curves == (one_process_run / "rl" / "curves.csv").read_text().splitlines()  # rank 0 wrote it once
    assert (run_dir / "rl" / "best_adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.slow
def test_a_token_budget_that_splits_one_process_and_not_the_other_gives_the_adapter_of_one_process(
    fixture_data_dir, one_process_run, tmp_path
):
    """At 450 tokens a pass, a process's two sequences of a 211-token prompt and 12 response tokens share one pass
    while those of a 214-token prompt take two: the processes must still backpropagate the same number of
    micro-batches (each backward all-reduces), or the run hangs."""
    run_dir = tmp_path / "budget"
    command = rl_command(fixture_data_dir, run_dir, *DDP, "rl.micro_batch_size=8", "rl.micro_batch_tokens=450")
    result = subprocess.run(command, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert_same_adapter(adapter(run_dir), adapter(one_process_run))


@pytest.mark.slow
def test_kill_9_under_ddp_then_resume_finishes_with_the_same_adapter(fixture_data_dir, one_process_run, tmp_path):
    run_dir = tmp_path / "killed"
    command = rl_command(fixture_data_dir, run_dir, *DDP)
    process = subprocess.Popen(command, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)  # fmt: skip
    last = run_dir / "rl" / "checkpoints" / "last.ckpt"
    deadline = time.time() + 300
    while time.time() < deadline and checkpoint_step(last) < 2 and process.poll() is None:
        time.sleep(0.05)
    assert process.poll() is None, "the run finished before it could be killed"
    os.killpg(process.pid, signal.SIGKILL)  # both processes, as when a machine fails
    process.wait()
    assert 2 <= checkpoint_step(last) < STEPS and not (run_dir / "rl" / "adapter").exists()

    result = subprocess.run(command, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert checkpoint_step(last) == STEPS
    assert_same_adapter(adapter(run_dir), adapter(one_process_run))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_two_nodes_started_by_torchrun_give_the_adapter_of_one_process(fixture_data_dir, one_process_run, tmp_path):
    """The README's multi-node launch, as two one-process "nodes" on this host: `trainer.num_nodes=2` and the
    same command on each node under torchrun, which Lightning then uses instead of launching processes itself."""
    run_dir = tmp_path / "nodes"
    python, script, *overrides = rl_command(fixture_data_dir, run_dir, "trainer=ddp", "trainer.devices=1",
                                            "trainer.num_nodes=2")  # fmt: skip
    port = free_port()
    logs = [tmp_path / f"node{rank}.log" for rank in (0, 1)]
    nodes = []
    for rank, log in enumerate(logs):
        launch = ["-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1", f"--node-rank={rank}",
                  "--master-addr=127.0.0.1", f"--master-port={port}"]  # fmt: skip
        with log.open("w") as out:  # files, not pipes: a full pipe would stall one node and with it the other
            nodes.append(subprocess.Popen([python, *launch, script, *overrides], cwd=ROOT, env=ENV, stdout=out,
                                          stderr=subprocess.STDOUT))  # fmt: skip
    codes = [node.wait(timeout=600) for node in nodes]
    outputs = [log.read_text() for log in logs]
    assert codes == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in outputs[1]
    assert_same_adapter(adapter(run_dir), adapter(one_process_run))
