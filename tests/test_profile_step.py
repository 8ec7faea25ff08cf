"""bench/profile_step.py: a GRPO step's phases under torch.profiler (issue 16's "profile before and after")."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch.profiler import ProfilerActivity, profile, record_function

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

import profile_step  # noqa: E402


def test_merged_length_counts_overlaps_once():
    assert profile_step.merged_length([]) == 0
    assert profile_step.merged_length([(0, 2), (1, 3), (5, 6), (5.5, 5.8)]) == pytest.approx(4.0)


def test_phase_report_attributes_host_work_to_the_phase_it_ran_in():
    a = torch.randn(64, 64)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        with record_function("phase/generation"):
            for _ in range(8):
                a = a @ a / 64
        with record_function("phase/reward"):
            a.sum()
    report = profile_step.phase_report(prof.events(), decoding_steps=8)
    assert set(report) == {"generation", "reward"}
    generation = report["generation"]
    assert generation["wall_ms"] > 0 and generation["wall_ms_per_decoding_step"] == generation["wall_ms"] / 8
    assert generation["kernels"] == 0 and generation["gpu_busy_ms"] == 0  # no device here: nothing on a GPU
    assert "wall_ms_per_decoding_step" not in report["reward"]


def event(name, start, end, device=False, annotation=False):
    """The fields of a profiler FunctionEvent that phase_report reads (a GPU's events cannot be made on the CPU)."""
    kind = torch.autograd.DeviceType.CUDA if device else torch.autograd.DeviceType.CPU
    return SimpleNamespace(
        name=name, device_type=kind, time_range=SimpleNamespace(start=start, end=end), is_user_annotation=annotation
    )


def test_phase_report_reads_host_ranges_and_leaves_the_gpu_copy_of_an_annotation_out():
    events = [
        event("phase/generation", 0, 1000),  # two host ranges of one phase add up
        event("phase/generation", 2000, 2500),
        event("phase/generation", 100, 140, device=True, annotation=True),  # the device's copy: not the phase's wall
        event("kernel_a", 100, 400, device=True),
        event("kernel_b", 300, 600, device=True),  # overlaps kernel_a: busy time counted once
        event("kernel_c", 2100, 2200, device=True),
        event("kernel_d", 1200, 1300, device=True),  # between the ranges: not generation's
        event("cudaLaunchKernel", 10, 20),
        event("cudaLaunchKernel", 2010, 2020),
        event("cudaStreamSynchronize", 900, 990),
    ]
    row = profile_step.phase_report(events, decoding_steps=10)["generation"]
    assert row["ranges"] == 2 and row["wall_ms"] == pytest.approx(1.5)
    assert row["kernels"] == 3 and row["gpu_busy_ms"] == pytest.approx(0.6)
    assert row["launches"] == 2 and row["synchronizations"] == 1
    assert row["gpu_busy_share"] == pytest.approx(0.4)
    assert row["launches_per_decoding_step"] == pytest.approx(0.2)


@pytest.mark.slow
def test_the_profiler_benchmark_runs_a_real_step_on_the_cpu(fixture_data_dir, tmp_path):
    command = [
        sys.executable, "profile_step.py", "--data", str(fixture_data_dir), "--prompts", "1", "--group", "2",
        "--response", "3", "--max-prompt", "256", "--micro-batch", "2", "--tiny-cpu", "--out", str(tmp_path),
        "--label", "dry",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run(command, cwd=ROOT / "bench", capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    phases = json.loads((tmp_path / "profile_dry.json").read_text())["phases"]
    assert {"generation", "reward", "forward_backward", "optimizer"} <= set(phases)
    assert all(p["wall_ms"] > 0 for p in phases.values())
    assert "aten::" in (tmp_path / "profile_dry.txt").read_text()
