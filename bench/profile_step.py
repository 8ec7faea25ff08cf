"""Where a GRPO step's time goes, phase by phase, under torch.profiler (issue 16, "profile before and after").

Same workload and options as bench/grpo_step.py. One warm-up step (it compiles the static decoding), then one
profiled step. Each phase of the step (`RLModule.timed` marks them `phase/<name>`: generation, reward,
reference_logprobs, forward_backward, optimizer) gets its wall time, the time the GPU was busy with kernels inside
it, and the CUDA runtime calls made from the host inside it: kernel and graph launches, synchronizations, copies.
Divided by the decoding steps (`--response`, every response is forced to that length), those say whether decoding
is bound by the GPU's work (busy close to wall) or by the host (launches and a synchronization per token).

    python bench/profile_step.py --data DIR --prompts 4 --group 8 --response 256 --fast --static --out OUT

Writes OUT/profile_<label>.json (phases), OUT/profile_<label>.txt (the top operators and kernels by self time on
the device) and OUT/profile_<label>_host.txt (the same by the host's self time);
`--trace` also writes a Chrome trace (large: about 100 MB at the 256-token workload). `--tiny-cpu` runs the same
code on the CPU with the tiny test model (a dry run: no GPU figures).
"""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import torch
from grpo_step import add_our_options, bench_model_config, build_module, workload_parser
from torch.profiler import ProfilerActivity, profile

PHASE_PREFIX = "phase/"
LAUNCHES = ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx", "cudaGraphLaunch")
SYNCS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")
COPIES = ("cudaMemcpyAsync", "cudaMemcpy")


def merged_length(intervals: list[tuple[float, float]]) -> float:
    """Total length covered by the intervals, overlaps counted once."""
    total, end = 0.0, float("-inf")
    for start, stop in sorted(intervals):
        if stop <= end:
            continue
        total += stop - max(start, end)
        end = stop
    return total


def is_annotation(event) -> bool:
    """A `record_function` range: on a GPU the profiler also puts each one on the device's timeline, as long as the
    kernels it covers (a user annotation, not work)."""
    return event.name.startswith(PHASE_PREFIX) or bool(getattr(event, "is_user_annotation", False))


def phase_report(events, decoding_steps: int) -> dict[str, dict[str, float]]:
    """Per `phase/<name>`: wall and GPU-busy milliseconds, runtime-call counts, and per decoding step for
    generation. `events`: the profiler's FunctionEvents (host ranges and device kernels, one clock). A phase's
    wall time is its host ranges' (the device's copy of an annotation is left out); ranges of the same name add up."""
    host = [e for e in events if e.device_type == torch.autograd.DeviceType.CPU]
    device = [e for e in events if e.device_type != torch.autograd.DeviceType.CPU and not is_annotation(e)]
    ranges: dict[str, list[tuple[float, float]]] = {}
    for e in host:
        if e.name.startswith(PHASE_PREFIX):
            ranges.setdefault(e.name.removeprefix(PHASE_PREFIX), []).append((e.time_range.start, e.time_range.end))
    report: dict[str, dict[str, float]] = {}
    for name, spans in ranges.items():
        inside = [e for e in host if any(s <= e.time_range.start and e.time_range.end <= t for s, t in spans)]
        kernels = [
            (max(e.time_range.start, s), min(e.time_range.end, t))
            for e in device
            for s, t in spans
            if e.time_range.end > s and e.time_range.start < t
        ]
        row = {
            "wall_ms": sum(t - s for s, t in spans) / 1e3,
            "ranges": len(spans),
            "gpu_busy_ms": merged_length(kernels) / 1e3,
            "kernels": len(kernels),
            "launches": sum(e.name in LAUNCHES for e in inside),
            "graph_launches": sum(e.name == "cudaGraphLaunch" for e in inside),
            "synchronizations": sum(e.name in SYNCS for e in inside),
            "copies": sum(e.name in COPIES for e in inside),
        }
        row["gpu_busy_share"] = row["gpu_busy_ms"] / row["wall_ms"] if row["wall_ms"] else 0.0
        if name == "generation" and decoding_steps:
            for key in ("wall_ms", "gpu_busy_ms", "launches", "synchronizations", "copies"):
                row[f"{key}_per_decoding_step"] = row[key] / decoding_steps
        report[name] = row
    return report


class ProfileOneStep(L.Callback):
    """Profiles the `step`-th training batch (0-based) and keeps the finished profiler for the report."""

    def __init__(self, step: int, activities):
        self.step, self.activities = step, activities
        self.profiler: profile | None = None
        self.batches = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.batches == self.step:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.profiler = profile(activities=self.activities)
            self.profiler.start()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.batches == self.step:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.profiler.stop()
        self.batches += 1


def main() -> None:
    parser = add_our_options(workload_parser())
    parser.add_argument("--label", default=None, help="name of the outputs (default from the workload)")
    parser.add_argument("--trace", action="store_true", help="also write a Chrome trace of the profiled step")
    parser.add_argument("--tiny-cpu", action="store_true", help="dry run on the CPU with conf/model/tiny.yaml")
    args = parser.parse_args()

    from cqr_lightning.modules.rl import RLModule
    from data_modules.conversations import ConversationDataModule

    model_cfg = bench_model_config(args, args.tiny_cpu)
    module, data_cfg = build_module(args, model_cfg, RLModule)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    profiled = ProfileOneStep(step=1, activities=activities)  # step 0 warms up and compiles
    trainer = L.Trainer(
        accelerator="cpu" if args.tiny_cpu else "gpu", devices=1, max_steps=2, logger=False,
        enable_checkpointing=False, limit_val_batches=0, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[profiled],
    )  # fmt: skip
    trainer.fit(module, datamodule=ConversationDataModule(data_cfg, batch_size=args.prompts))
    prof = profiled.profiler
    label = args.label or f"p{args.prompts}_g{args.group}_r{args.response}" + ("_static" if args.static else "")
    label += f"_bucket{args.static_bucket}" if args.static and args.static_bucket else ""
    label += "_loop" if args.static and args.loop else ""
    sort_by = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
    result = {
        "workload": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__,
        "phases": phase_report(prof.events(), args.response),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"profile_{label}.json").write_text(json.dumps(result, indent=2))
    averages = prof.key_averages()
    table = averages.table(sort_by=sort_by, row_limit=40, max_name_column_width=60)
    (args.out / f"profile_{label}.txt").write_text(table)
    host_table = averages.table(sort_by="self_cpu_time_total", row_limit=40, max_name_column_width=60)
    (args.out / f"profile_{label}_host.txt").write_text(host_table)  # where the host's time goes
    if args.trace:
        prof.export_chrome_trace(str(args.out / f"trace_{label}.json"))
    print(json.dumps(result["phases"], indent=2))


if __name__ == "__main__":
    main()
