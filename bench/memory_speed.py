"""GRPO step time and peak memory with `rl.logprob_chunk_size` off and on, with the sampling copy released
during the loss passes (`rl.release_sampling_copy`) or kept, and with each prompt once a group in the loss passes
(`rl.shared_prompt_passes`) or not, in one process (issue 16).

Same workload and options as bench/grpo_step.py. One warm-up step (full logits; it compiles the static decoding),
then `--rounds` rounds of one step per `--chunk-sizes` entry ("none" = full logits; "256+release" = chunks of 256
with the copy released; "256+release+shared" = the same with rl.shared_prompt_passes), so every setting shares one
loaded policy, one compiled decoder and the machine's state.
Before each step the allocator's cache is emptied and its peak counters reset, so each step's peak allocated and
reserved memory are its own; the peak is also split into the sampling phase and the loss passes (reference
log-probs + forward/backward + optimizer).

    python bench/memory_speed.py --data DIR --prompts 4 --group 8 --response 256 --fast --static \
        --entropy-coef 0.001 --chunk-sizes none,1024,1024+release --rounds 2 --out OUT

Writes OUT/memory_speed_<label>.json and prints one line per step. `--tiny-cpu` runs the same code on the CPU
with the tiny test model (a dry run of the script: no memory figures, times meaningless).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import NamedTuple

import lightning as L
import torch
from grpo_step import add_our_options, bench_model_config, build_module, workload_parser

GIB = 2**30


RELEASE = "+release"
SHARED = "+shared"


class Setting(NamedTuple):
    """One step's loss-pass settings: rl.logprob_chunk_size, rl.release_sampling_copy, rl.shared_prompt_passes."""

    chunk_size: int | None
    release: bool = False
    shared: bool = False


def parse_setting(item: str) -> Setting:
    """'256' -> Setting(256); 'none+release' -> Setting(None, release=True); '256+release+shared' -> all three."""
    size_text, *suffixes = item.strip().lower().split("+")
    flags = {f"+{suffix}" for suffix in suffixes}
    if flags - {RELEASE, SHARED}:
        raise ValueError(item)
    size = None if size_text in ("none", "null", "off") else int(size_text)
    if size is not None and size < 1:
        raise ValueError(size_text)
    return Setting(size, RELEASE in flags, SHARED in flags)


def parse_chunk_sizes(text: str) -> list[Setting]:
    try:
        return [parse_setting(item) for item in text.split(",")]
    except ValueError:
        raise SystemExit(
            f"--chunk-sizes {text}: each entry is a positive token count or 'none', optionally followed by "
            f"'{RELEASE}' and/or '{SHARED}'"
        ) from None


def setting_name(setting: Setting) -> str:
    return f"{setting.chunk_size}{RELEASE if setting.release else ''}{SHARED if setting.shared else ''}"


def cuda() -> bool:
    return torch.cuda.is_available()


def peaks() -> dict[str, float]:
    if not cuda():
        return {}
    return {
        "allocated_gib": torch.cuda.max_memory_allocated() / GIB,
        "reserved_gib": torch.cuda.max_memory_reserved() / GIB,
    }


def reset_peaks() -> None:
    if cuda():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def phase_peaks_module(base_class):
    """`base_class` (RLModule) recording the peak memory of sampling and of the loss passes separately."""

    class PhasePeaks(base_class):
        def sample(self, turns, *args, **kwargs):
            reset_peaks()
            samples = super().sample(turns, *args, **kwargs)
            self.phase_peaks = {"generation": peaks()}
            return samples

        def update(self, *args, **kwargs):
            reset_peaks()
            metrics = super().update(*args, **kwargs)
            self.phase_peaks["loss_passes"] = peaks()
            return metrics

    return PhasePeaks


class Schedule(L.Callback):
    """Sets `logprob_chunk_size`, `release_sampling_copy` and `shared_prompt_passes` before each step and records the
    step's time, phases and peaks."""

    def __init__(self, settings: list[Setting]):
        self.settings = settings
        self.rows: list[dict] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        setting = self.settings[trainer.global_step]
        pl_module.logprob_chunk_size = setting.chunk_size
        pl_module.release_sampling_copy = setting.release
        pl_module.shared_prompt_passes = setting.shared
        if cuda():
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
        reset_peaks()
        self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if cuda():
            torch.cuda.synchronize()
        row = {
            "step": len(self.rows),
            "warm_up": not self.rows,
            "logprob_chunk_size": pl_module.logprob_chunk_size,
            "release_sampling_copy": pl_module.release_sampling_copy,
            "shared_prompt_passes": pl_module.shared_prompt_passes,
            "setting": setting_name(
                Setting(pl_module.logprob_chunk_size, pl_module.release_sampling_copy, pl_module.shared_prompt_passes)
            ),
            "step_seconds": time.perf_counter() - self.start,
            "phases": {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("time/")},
            "response_tokens": float(trainer.callback_metrics["train/response_tokens"]),
            "peak": dict(pl_module.phase_peaks),
        }
        self.rows.append(row)
        print(step_line(row), flush=True)


def step_line(row: dict) -> str:
    phases = ", ".join(f"{k[5:]} {v:.2f}" for k, v in row["phases"].items())
    line = f"step {row['step']} chunk={row['setting']}: {row['step_seconds']:.2f} s ({phases})"
    for phase, peak in row["peak"].items():
        if peak:
            line += f" | {phase} peak {peak['allocated_gib']:.2f} / {peak['reserved_gib']:.2f} GiB"
    return line


def summarize(rows: list[dict], settings: list[Setting]) -> dict[str, dict]:
    """Per setting: mean step time and phases, and the highest peaks, over the timed (non-warm-up) steps."""
    summary = {}
    for name in dict.fromkeys(setting_name(setting) for setting in settings):
        timed = [r for r in rows if not r["warm_up"] and r["setting"] == name]
        if not timed:
            continue
        entry = {"steps": len(timed), "step_seconds": sum(r["step_seconds"] for r in timed) / len(timed)}
        for key in timed[0]["phases"]:
            entry[key] = sum(r["phases"][key] for r in timed) / len(timed)
        for phase in timed[0]["peak"]:
            for kind in timed[0]["peak"][phase]:
                entry[f"peak_{phase}_{kind}"] = max(r["peak"][phase][kind] for r in timed)
        summary[name] = entry
    return summary


def main() -> None:
    parser = add_our_options(workload_parser())
    parser.add_argument(
        "--chunk-sizes",
        default="none,1024",
        help="comma-separated; 'none' = full logits; a '+release' suffix releases the sampling copy in the loss "
        "passes, a '+shared' suffix runs each prompt once a group in them (rl.shared_prompt_passes)",
    )
    parser.add_argument("--rounds", type=int, default=1, help="timed steps per chunk size")
    parser.add_argument("--label", default=None, help="name of the JSON summary (default from the workload)")
    parser.add_argument("--tiny-cpu", action="store_true", help="dry run on the CPU with conf/model/tiny.yaml")
    args = parser.parse_args()
    settings = parse_chunk_sizes(args.chunk_sizes)
    # warm-up with full logits (and --shared-prompts as given), then the settings in turn
    schedule = [Setting(None, False, args.shared_prompts)] + settings * args.rounds

    from cqr_lightning.modules.rl import RLModule
    from data_modules.conversations import ConversationDataModule

    model_cfg = bench_model_config(args, args.tiny_cpu)
    module, data_cfg = build_module(args, model_cfg, phase_peaks_module(RLModule))
    timings = Schedule(schedule)
    trainer = L.Trainer(
        accelerator="cpu" if args.tiny_cpu else "gpu", devices=1, max_steps=len(schedule), logger=False,
        enable_checkpointing=False, limit_val_batches=0, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[timings],
    )  # fmt: skip
    trainer.fit(module, datamodule=ConversationDataModule(data_cfg, batch_size=args.prompts))
    label = args.label or f"p{args.prompts}_g{args.group}_r{args.response}_mb{args.micro_batch}"
    result = {
        "workload": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "device": torch.cuda.get_device_name() if cuda() else "cpu",
        "by_chunk_size": summarize(timings.rows, settings),
        "steps": timings.rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"memory_speed_{label}.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result["by_chunk_size"], indent=2))


if __name__ == "__main__":
    main()
