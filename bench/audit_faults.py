"""Fault and bad-input audit: run every case of issue 15 (and a few more) through the real commands on the CPU.

`python bench/audit_faults.py --out audit.json [--only NAME ...] [--keep]`

Each case starts `train.py`, `python -m cqr_lightning.evaluate` or `python -m cqr_lightning.index` in a subprocess
with the tiny in-process model and a small corpus and conversations written here into a temporary folder, under
a timeout, and sorts the outcome into one class:

- OK: the expected outcome (a clear error naming the file and line or the setting, an exact resume, a success);
- RAW_TRACEBACK: a Python traceback reached the user for a user mistake (or an error that names neither file nor
  setting);
- HANG: the command did not end within its timeout;
- WRONG: a silently wrong result (bad input accepted, other numbers than an uninterrupted run);
- LOST_PROGRESS: a rerun redid steps that were already checkpointed, or a metric point went missing.

It prints a table and writes the results as JSON to `--out`.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TRACEBACK = "Traceback (most recent call last)"
STEPS = 5  # optimizer steps of the interrupted runs (and of the uninterrupted run they are compared with)
CLASSES = ("OK", "RAW_TRACEBACK", "HANG", "WRONG", "LOST_PROGRESS")

TOPICS = {  # topic: (passage 1, passage 2, first question, follow-up, its rewrite)
    "volcano": ("Mount Etna is an active volcano on the east coast of Sicily.",
                "Etna erupted strongly in 1669 and lava reached the city of Catania.",
                "Where is Mount Etna?", "When did it last destroy a city?", "When did Etna lava reach Catania?"),
    "violin": ("The violin is a string instrument played with a bow and has four strings.",
               "Antonio Stradivari built about 1100 violins in Cremona in the 17th century.",
               "How many strings does a violin have?", "Who built the famous ones?", "Who built famous violins?"),
    "moon": ("The Moon orbits the Earth at an average distance of 384,400 kilometres.",
             "Apollo 11 landed the first people on the Moon in July 1969.",
             "How far away is the Moon?", "When did people first land there?", "When did people land on the Moon?"),
    "coffee": ("Coffee plants grow best in the tropical highlands between the tropics.",
               "Brazil has been the largest producer of coffee for more than 150 years.",
               "Where does coffee grow?", "Which country produces the most?", "Which country produces most coffee?"),
    "glacier": ("A glacier is a body of dense ice that moves slowly under its own weight.",
                "The Aletsch glacier in the Swiss Alps is the largest glacier of the Alps.",
                "What is a glacier?", "Which one is the largest in the Alps?", "Which is the largest Alpine glacier?"),
    "chess": ("Chess is a board game for two players on a board of 64 squares.",
              "Magnus Carlsen held the world chess championship from 2013 to 2023.",
              "How many squares has a chess board?", "Who was champion for ten years?",
              "Who was world chess champion from 2013 to 2023?"),
}  # fmt: skip


def turn_rows(topics: dict = TOPICS) -> list[dict]:
    rows = []
    for name, (_, _, first, follow, rewrite) in topics.items():
        opening = {"id": f"{name}_1", "history": [], "question": first, "positives": [f"{name}-1"], "rewrite": first}
        history = [{"role": "user", "text": first}, {"role": "assistant", "text": "See the passage."}]
        second = {"id": f"{name}_2", "history": history, "question": follow, "positives": [f"{name}-2"],
                  "rewrite": rewrite}  # fmt: skip
        rows += [opening, second]
    return rows


def jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(row) + "\n" for row in rows)


def write_data(folder: Path) -> Path:
    """corpus.jsonl (12 passages), train.jsonl (8 turns) and dev.jsonl (4 turns)."""
    folder.mkdir(parents=True, exist_ok=True)
    passages = [
        {"id": f"{name}-{i}", "title": name, "contents": text}
        for name, texts in TOPICS.items()
        for i, text in enumerate(texts[:2], start=1)
    ]
    (folder / "corpus.jsonl").write_text(jsonl(passages))
    rows = turn_rows()
    (folder / "train.jsonl").write_text(jsonl(rows[:8]))
    (folder / "dev.jsonl").write_text(jsonl(rows[8:]))
    return folder


@dataclass
class Outcome:
    name: str
    expected: str
    result: str = "OK"
    detail: str = ""
    seconds: float = 0.0
    commands: list[str] = field(default_factory=list)


@dataclass
class Done:
    returncode: int | None  # None: killed at the timeout
    output: str
    seconds: float


class Audit:
    def __init__(self, work: Path, timeout: float):
        self.work = work
        self.timeout = timeout
        self.cache = work / "cache"
        self.data = write_data(work / "data")
        self.env = {
            **os.environ,
            "PYTHONPATH": str(ROOT),
            "PYTHONUNBUFFERED": "1",
            "CQR_CACHE_DIR": str(self.cache),
            "MLFLOW_DISABLE_TELEMETRY": "true",
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "TQDM_DISABLE": "1",
        }
        self.commands: list[str] = []

    # ------------------------------------------------------------------------------------------ helpers

    def folder(self, name: str) -> Path:
        path = self.work / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    def data_copy(self, name: str) -> Path:
        """A private copy of the data that a case may damage."""
        target = self.work / name
        shutil.copytree(self.data, target)
        return target

    def train_args(self, data: Path, run_dir: Path, *extra: str, steps: int = 2) -> list[str]:
        tracking = run_dir.parent / f"{run_dir.name}-mlflow.db"
        stage = [] if any(e.startswith("stage=") for e in extra) else ["stage=rl"]
        return [
            sys.executable, "train.py", *stage, "model=tiny", "data=jsonl", f"data.dir={data}",
            f"run_dir={run_dir}", f"logger.tracking_uri=sqlite:///{tracking}",
            f"logger.artifact_location={run_dir.parent / (run_dir.name + '-artifacts')}",
            "trainer.accelerator=cpu", f"rl.max_steps={steps}", "rl.batch_size=2", "rl.group_size=2",
            "rl.max_new_tokens=8", "rl.micro_batch_size=2", "rl.val_limit=2", "rl.val_every_n_steps=1000",
            "rl.checkpoint_every_n_steps=1", "rl.table_every_n_steps=1000", "warmup.max_new_tokens=8",
            "warmup.val_limit=2", "warmup.batch_size=2", "warmup.epochs=1", "eval.rewriter.max_new_tokens=8",
            *extra,
        ]  # fmt: skip

    def evaluate_args(self, *extra: str) -> list[str]:
        return [sys.executable, "-m", "cqr_lightning.evaluate", "rewriter=raw", "logger=none", *extra]

    def run(self, args: list[str], timeout: float | None = None, **popen) -> Done:
        self.commands.append(" ".join(str(a) for a in args))
        start = time.time()
        process = subprocess.Popen(args, cwd=ROOT, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                   text=True, errors="replace", **popen)  # fmt: skip
        try:
            output, _ = process.communicate(timeout=timeout or self.timeout)
            return Done(process.returncode, output, time.time() - start)
        except subprocess.TimeoutExpired:
            process.kill()
            output, _ = process.communicate()
            return Done(None, output, time.time() - start)

    def start(self, args: list[str]) -> subprocess.Popen:
        self.commands.append(" ".join(str(a) for a in args))
        return subprocess.Popen(args, cwd=ROOT, env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def wait_for(self, process: subprocess.Popen, condition: Callable[[], bool]) -> bool:
        """Poll until `condition()` holds while `process` runs; False when it ended first or time ran out."""
        deadline = time.time() + self.timeout
        while time.time() < deadline and process.poll() is None:
            if condition():
                return True
            time.sleep(0.05)
        return False

    # ------------------------------------------------------------------------------------------ judges

    @staticmethod
    def expect_error(done: Done, *needles: str, forbidden: tuple[str, ...] = ()) -> tuple[str, str]:
        """A user mistake: a non-zero exit with a message holding every needle, and no traceback."""
        last = done.output.strip().splitlines()[-3:] if done.output.strip() else []
        tail = " | ".join(line.strip() for line in last)[-400:]
        if done.returncode is None:
            return "HANG", f"no end within the timeout; last output: {tail}"
        if done.returncode == 0:
            return "WRONG", "the command succeeded on a bad input"
        if TRACEBACK in done.output:
            return "RAW_TRACEBACK", tail
        missing = [n for n in needles if n not in done.output]
        if missing:
            return "WRONG", f"the message does not name {missing}: {tail}"
        bad = [n for n in forbidden if n in done.output]
        if bad:
            return "WRONG", f"misleading message ({bad}): {tail}"
        return "OK", tail

    @staticmethod
    def expect_success(done: Done) -> tuple[str, str]:
        if done.returncode is None:
            return "HANG", "no end within the timeout"
        if done.returncode != 0:
            kind = "RAW_TRACEBACK" if TRACEBACK in done.output else "WRONG"
            return kind, f"exit code {done.returncode}: {done.output.strip()[-400:]}"
        return "OK", ""


# ---------------------------------------------------------------------------------------------- checkpoints


def checkpoint_step(path: Path) -> int:
    import torch

    try:
        return int(torch.load(path, map_location="cpu", weights_only=True)["global_step"])
    except Exception:
        return -1


def newest_step(folder: Path) -> int:
    return max((checkpoint_step(p) for p in folder.glob("*.ckpt")), default=-1)


def curve_steps(run_dir: Path, key: str = "train/reward_mean") -> list[int]:
    path = run_dir / "rl" / "curves.csv"
    if not path.is_file():
        return []
    return [int(line.split(",")[0]) for line in path.read_text().splitlines() if f",{key}," in line]


def mlflow_steps(tracking: Path, run_dir: Path, key: str = "train/reward_mean") -> list[list[int]]:
    """Per MLflow run of `run_dir`'s RL stage, the steps at which `key` was logged."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tracking}")
    experiment = client.get_experiment_by_name("cqr-lightning")
    runs = client.search_runs([experiment.experiment_id]) if experiment else []
    runs = [r for r in runs if r.data.tags.get("stage") == "rl"]
    return [sorted(m.step for m in client.get_metric_history(r.info.run_id, key)) for r in runs]


def same_adapter(first: Path, second: Path) -> bool:
    import torch
    from safetensors.torch import load_file

    a = load_file(first / "adapter_model.safetensors")
    b = load_file(second / "adapter_model.safetensors")
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------------------------------------- cases


def case_sigkill_resume(audit: Audit, out: Outcome) -> None:
    """kill -9 mid-run, rerun: the adapter matches an uninterrupted run bit for bit, each step logged once."""
    straight = audit.work / "straight"
    done = audit.run(audit.train_args(audit.data, straight, steps=STEPS))
    if done.returncode != 0:
        out.result, out.detail = audit.expect_success(done)
        return
    killed = audit.work / "killed"
    args = audit.train_args(audit.data, killed, steps=STEPS)
    process = audit.start(args)
    folder = killed / "rl" / "checkpoints"
    alive = audit.wait_for(process, lambda: newest_step(folder) >= 3)
    process.send_signal(signal.SIGKILL)
    process.wait()
    at_kill = newest_step(folder)
    if not alive or at_kill >= STEPS:
        out.result, out.detail = "WRONG", f"could not kill mid-run (checkpoint step {at_kill})"
        return
    shutil.copytree(killed, audit.work / "interrupted-template")  # the damaged-checkpoint cases start from it
    shutil.copy(killed.parent / "killed-mlflow.db", audit.work / "interrupted-template-mlflow.db")
    done = audit.run(args)
    if done.returncode != 0:
        out.result, out.detail = audit.expect_success(done)
        return
    steps = curve_steps(killed)
    logged = mlflow_steps(killed.parent / "killed-mlflow.db", killed)
    if steps != list(range(1, STEPS + 1)) or logged != [list(range(1, STEPS + 1))]:
        out.result, out.detail = "LOST_PROGRESS", f"killed at step {at_kill}; curves.csv {steps}, MLflow {logged}"
    elif not same_adapter(straight / "rl" / "adapter", killed / "rl" / "adapter"):
        out.result, out.detail = "WRONG", "the resumed adapter differs from the uninterrupted run's"
    else:
        out.detail = f"killed at step {at_kill}; resumed to {STEPS}, adapter bit-identical, each step logged once"


def case_sigterm_then_kill(audit: Audit, out: Outcome) -> None:
    """SIGTERM before the first periodic checkpoint, kill -9 after a later one, rerun: continue from the newest."""
    run_dir = audit.work / "sigterm-kill"
    args = audit.train_args(audit.data, run_dir, "rl.checkpoint_every_n_steps=3", steps=STEPS)
    folder = run_dir / "rl" / "checkpoints"
    first = audit.start(args)
    if not audit.wait_for(first, lambda: len(curve_steps(run_dir)) >= 1):
        out.result, out.detail = "WRONG", "the first run ended before the SIGTERM"
        return
    first.send_signal(signal.SIGTERM)
    code = first.wait(timeout=audit.timeout)
    sigterm_step = newest_step(folder)
    second = audit.start(args)
    reached = audit.wait_for(second, lambda: newest_step(folder) >= 3)
    second.send_signal(signal.SIGKILL)
    second.wait()
    newest = newest_step(folder)
    if code != 143 or not reached or newest >= STEPS:
        out.result, out.detail = "WRONG", f"SIGTERM exit {code}, step {sigterm_step}; newest after kill {newest}"
        return
    before = len(curve_steps(run_dir))
    done = audit.run(args)
    if done.returncode != 0:
        out.result, out.detail = audit.expect_success(done)
        return
    rerun = curve_steps(run_dir)[before:]
    logged = mlflow_steps(run_dir.parent / "sigterm-kill-mlflow.db", run_dir)
    out.detail = f"SIGTERM at step {sigterm_step}, kill -9 at {newest}; the rerun logged steps {rerun}; MLflow {logged}"
    if rerun != list(range(newest + 1, STEPS + 1)):
        out.result = "LOST_PROGRESS"
    elif not same_adapter(audit.work / "straight" / "rl" / "adapter", run_dir / "rl" / "adapter"):
        out.result, out.detail = "WRONG", out.detail + "; the adapter differs from the uninterrupted run's"


def case_mlflow_points(audit: Audit, out: Outcome) -> None:
    """SIGTERM mid-run: every finished step is in MLflow at once; after the resume each step is there once."""
    run_dir = audit.work / "sigterm-mlflow"
    tracking = run_dir.parent / "sigterm-mlflow-mlflow.db"
    args = audit.train_args(audit.data, run_dir, "rl.checkpoint_every_n_steps=100", steps=3)
    process = audit.start(args)
    if not audit.wait_for(process, lambda: len(curve_steps(run_dir)) >= 1):
        out.result, out.detail = "WRONG", "the run ended before the SIGTERM"
        return
    process.send_signal(signal.SIGTERM)
    process.wait(timeout=audit.timeout)
    stopped = newest_step(run_dir / "rl" / "checkpoints")
    at_stop = mlflow_steps(tracking, run_dir)
    done = audit.run(args)
    if done.returncode != 0:
        out.result, out.detail = audit.expect_success(done)
        return
    after = mlflow_steps(tracking, run_dir)
    out.detail = f"stopped at step {stopped}; MLflow then {at_stop}, after the resume {after}"
    if at_stop != [list(range(1, stopped + 1))] or after != [list(range(1, 4))]:
        out.result = "LOST_PROGRESS"


def damaged_checkpoint_case(how: str) -> Callable[[Audit, Outcome], None]:
    def case(audit: Audit, out: Outcome) -> None:
        template = audit.work / "interrupted-template"
        if not template.is_dir():
            out.result, out.detail = "WRONG", "needs the sigkill_resume case first (its interrupted run)"
            return
        run_dir = audit.work / f"damaged-{how}"
        shutil.copytree(template, run_dir)
        shutil.copy(audit.work / "interrupted-template-mlflow.db", audit.work / f"damaged-{how}-mlflow.db")
        last = run_dir / "rl" / "checkpoints" / "last.ckpt"
        data = last.read_bytes()
        damaged = {
            "zero_byte": b"",
            "random": random.Random(0).randbytes(len(data)),
            "truncated": data[: len(data) // 2],
            "bit_flipped": data[:1000] + bytes(b ^ 0xFF for b in data[1000:1064]) + data[1064:],
        }[how]
        last.write_bytes(damaged)
        done = audit.run(audit.train_args(audit.data, run_dir, steps=STEPS))
        if how == "bit_flipped" and done.returncode == 0:  # a flip inside the tensors' bytes may still load
            out.result, out.detail = "OK", "the flipped bytes left a loadable checkpoint; the run finished"
            return
        forbidden = ("weights_only=False",)
        out.result, out.detail = audit.expect_error(done, "last.ckpt", "resume=false", forbidden=forbidden)

    return case


def case_resume_false_beside_damaged(audit: Audit, out: Outcome) -> None:
    """resume=false beside a damaged last.ckpt starts over; a kill -9 of that run then resumes from its own step."""
    template = audit.work / "interrupted-template"
    if not template.is_dir():
        out.result, out.detail = "WRONG", "needs the sigkill_resume case first (its interrupted run)"
        return
    run_dir = audit.work / "resume-false"
    shutil.copytree(template, run_dir)
    shutil.copy(audit.work / "interrupted-template-mlflow.db", audit.work / "resume-false-mlflow.db")
    folder = run_dir / "rl" / "checkpoints"
    (folder / "last.ckpt").write_bytes(b"not a checkpoint")
    before = len(curve_steps(run_dir))
    process = audit.start(audit.train_args(audit.data, run_dir, "resume=false", steps=STEPS))

    def fresh_run_checkpointed() -> bool:  # the old folder moved aside first, so its checkpoints do not count
        return any(folder.parent.glob("checkpoints.old-*")) and newest_step(folder) >= 3

    reached = audit.wait_for(process, fresh_run_checkpointed)
    process.send_signal(signal.SIGKILL)
    process.wait()
    at_kill = newest_step(folder)
    if not reached or at_kill >= STEPS:
        out.result, out.detail = "WRONG", f"could not kill the fresh start mid-run (step {at_kill})"
        return
    middle = len(curve_steps(run_dir))
    done = audit.run(audit.train_args(audit.data, run_dir, steps=STEPS))
    if done.returncode != 0:
        out.result, out.detail = audit.expect_success(done)
        return
    fresh, rerun = curve_steps(run_dir)[before:middle], curve_steps(run_dir)[middle:]
    aside = sorted(p.name for p in folder.parent.glob("checkpoints.old-*"))
    out.detail = f"set aside {aside}; the fresh start logged {fresh}, killed at {at_kill}; the rerun logged {rerun}"
    if not aside or fresh[:1] != [1]:
        out.result = "WRONG"
    elif rerun != list(range(at_kill + 1, STEPS + 1)):
        out.result = "LOST_PROGRESS"


def empty_split_case(stage: str, text: str) -> Callable[[Audit, Outcome], None]:
    def case(audit: Audit, out: Outcome) -> None:
        data = audit.data_copy(f"empty-{stage}-{len(text)}")
        (data / "train.jsonl").write_text(text)
        run_dir = audit.work / f"empty-{stage}-{len(text)}-run"
        done = audit.run(audit.train_args(data, run_dir, f"stage={stage}"), timeout=min(audit.timeout, 180))
        out.result, out.detail = audit.expect_error(
            done, "train.jsonl", "holds no turn", forbidden=("raise warmup.num_samples",)
        )

    return case


def case_duplicate_eval_ids(audit: Audit, out: Outcome) -> None:
    data = audit.data_copy("duplicate-ids")
    lines = (data / "dev.jsonl").read_text().splitlines(keepends=True)
    (data / "dev.jsonl").write_text("".join([*lines, lines[1]]))
    done = audit.run(audit.evaluate_args("data=jsonl", f"data.dir={data}", f"output_dir={audit.work / 'dup-out'}"))
    out.result, out.detail = audit.expect_error(done, f"dev.jsonl:{len(lines) + 1}", "appears more than once")


def case_duplicate_ids_in_training_validation(audit: Audit, out: Outcome) -> None:
    data = audit.data_copy("duplicate-ids-train")
    lines = (data / "dev.jsonl").read_text().splitlines(keepends=True)
    (data / "dev.jsonl").write_text("".join([*lines, lines[0]]))
    done = audit.run(audit.train_args(data, audit.work / "duplicate-ids-train-run"))
    out.result, out.detail = audit.expect_error(done, f"dev.jsonl:{len(lines) + 1}", "appears more than once")


def case_jsonl_without_dir_evaluate(audit: Audit, out: Outcome) -> None:
    done = audit.run(audit.evaluate_args("data=jsonl", f"output_dir={audit.work / 'nodir-out'}"))
    out.result, out.detail = audit.expect_error(done, "data.dir")
    if out.result == "OK" and (audit.work / "nodir-out" / "metrics.json").exists():
        out.result, out.detail = "WRONG", "metrics.json written (the demo data was evaluated)"


def case_jsonl_without_dir_train(audit: Audit, out: Outcome) -> None:
    args = [a for a in audit.train_args(audit.data, audit.work / "nodir-run") if not a.startswith("data.dir=")]
    done = audit.run(args)
    out.result, out.detail = audit.expect_error(done, "data.dir")


def trained_adapter(audit: Audit) -> Path | None:
    adapter = audit.work / "straight" / "rl" / "adapter"
    return adapter if (adapter / "adapter_config.json").is_file() else None


def case_adapter_other_base(audit: Audit, out: Outcome) -> None:
    adapter = trained_adapter(audit)
    if adapter is None:
        out.result, out.detail = "WRONG", "needs the sigkill_resume case first (its adapter)"
        return
    run_dir = audit.work / "other-base"
    done = audit.run(audit.train_args(audit.data, run_dir, f"model.adapter={adapter}", "model.tiny_seed=1"))
    out.result, out.detail = audit.expect_error(done, "model.adapter", "tiny_seed")


def case_adapter_wrong_shape(audit: Audit, out: Outcome) -> None:
    adapter = trained_adapter(audit)
    if adapter is None:
        out.result, out.detail = "WRONG", "needs the sigkill_resume case first (its adapter)"
        return
    wrong = audit.work / "wrong-shape-adapter"
    shutil.copytree(adapter, wrong)
    config = json.loads((wrong / "adapter_config.json").read_text())
    config["r"] = config["r"] * 2  # the saved matrices keep the old rank
    (wrong / "adapter_config.json").write_text(json.dumps(config))
    done = audit.run(audit.train_args(audit.data, audit.work / "wrong-shape", f"model.adapter={wrong}"))
    out.result, out.detail = audit.expect_error(done, "model.adapter")
    if out.result == "OK" and done.output.count("size mismatch") > 1:
        out.result, out.detail = "WRONG", "one message per LoRA matrix instead of one error"


def case_huge_question(audit: Audit, out: Outcome) -> None:
    """A 5 MB question: cut to model.max_prompt_length with a warning naming the turn; training runs."""
    data = audit.data_copy("huge-question")
    rows = [row for row in turn_rows() if row["history"]][:2]
    rows[0] = {**rows[0], "id": "huge_2", "question": "why is that so " * (5_000_000 // 15)}
    (data / "train.jsonl").write_text(jsonl(rows))
    done = audit.run(audit.train_args(data, audit.work / "huge-run", "rl.val_limit=1", steps=1))
    out.result, out.detail = audit.expect_success(done)
    if out.result == "OK" and "huge_2" not in done.output:
        out.result, out.detail = "WRONG", "no warning names the cut turn huge_2"
    elif out.result == "OK":
        out.detail = next((line.strip()[:300] for line in done.output.splitlines() if "huge_2" in line), "")


def case_malformed_deep_line(audit: Audit, out: Outcome) -> None:
    data = audit.data_copy("malformed-deep")
    base = [row for row in turn_rows() if row["history"]]
    rows = [{**base[i % len(base)], "id": f"t{i}"} for i in range(599)]
    (data / "train.jsonl").write_text(jsonl(rows) + '{"id": "t599", "history": [}\n')
    done = audit.run(audit.train_args(data, audit.work / "malformed-deep-run"))
    out.result, out.detail = audit.expect_error(done, "train.jsonl:600")
    if done.seconds > 60:
        out.result, out.detail = "WRONG", f"the error came after {done.seconds:.0f} s, not at the start"


def setting_case(*overrides: str, needle: str) -> Callable[[Audit, Outcome], None]:
    def case(audit: Audit, out: Outcome) -> None:
        run_dir = audit.work / ("setting-" + "-".join(o.replace("=", "_") for o in overrides))
        done = audit.run(audit.train_args(audit.data, run_dir, *overrides))
        out.result, out.detail = audit.expect_error(done, needle)
        if out.result == "OK" and (run_dir / "rl" / "checkpoints").exists():
            out.result, out.detail = "WRONG", "training started before the setting was refused"

    return case


def invalid_utf8_case(file: str, line: int, old: bytes, new: bytes) -> Callable[[Audit, Outcome], None]:
    def case(audit: Audit, out: Outcome) -> None:
        data = audit.data_copy(f"utf8-{file}")
        lines = (data / file).read_bytes().splitlines(keepends=True)
        if old not in lines[line - 1]:
            raise ValueError(f"{file}:{line} holds no {old!r} to damage")
        lines[line - 1] = lines[line - 1].replace(old, new, 1)
        (data / file).write_bytes(b"".join(lines))
        done = audit.run(audit.train_args(data, audit.work / f"utf8-{file}-run"))
        out.result, out.detail = audit.expect_error(done, f"{file}:{line}", "invalid UTF-8")

    return case


def case_index_empty_corpus(audit: Audit, out: Outcome) -> None:
    data = audit.folder("empty-corpus")
    (data / "corpus.jsonl").write_text("\n")
    done = audit.run([sys.executable, "-m", "cqr_lightning.index", "retriever=bm25s", "data=jsonl", f"data.dir={data}"])
    out.result, out.detail = audit.expect_error(done, "corpus.jsonl", "no passage")


def case_index_folder_mode(audit: Audit, out: Outcome) -> None:
    """With umask 022 every folder the index command creates is readable and searchable by other users."""
    data = audit.data_copy("index-mode")
    cache = audit.work / "index-mode-cache"
    env_cache, audit.env["CQR_CACHE_DIR"] = audit.env["CQR_CACHE_DIR"], str(cache)
    try:
        args = [sys.executable, "-m", "cqr_lightning.index", "retriever=bm25s", "data=jsonl", f"data.dir={data}"]
        done = audit.run(args, preexec_fn=lambda: os.umask(0o022))
    finally:
        audit.env["CQR_CACHE_DIR"] = env_cache
    out.result, out.detail = audit.expect_success(done)
    if out.result != "OK":
        return
    folders = [p for p in [cache, *cache.rglob("*")] if p.is_dir()]
    private = [f"{p.relative_to(cache.parent)} {oct(p.stat().st_mode & 0o777)}" for p in folders
               if p.stat().st_mode & 0o055 != 0o055]  # fmt: skip
    if not folders:
        out.result, out.detail = "WRONG", "no index folder was created"
    elif private:
        out.result, out.detail = "WRONG", f"not readable by others: {private[:3]}"
    else:
        out.detail = f"{len(folders)} folders, all group/other readable"


FULL_DISK = """
import errno, os, runpy, sys
real_fsync = os.fsync
def full(fd):
    raise OSError(errno.ENOSPC, "No space left on device")
os.fsync = full
sys.argv = ["cqr_lightning.evaluate", *sys.argv[1:]]
runpy.run_module("cqr_lightning.evaluate", run_name="__main__", alter_sys=True)
"""


def case_full_disk(audit: Audit, out: Outcome) -> None:
    """Every fsync fails with ENOSPC: the command stops with the error named, leaving no temporary file."""
    output_dir = audit.work / "full-disk-out"
    args = [sys.executable, "-c", FULL_DISK, *audit.evaluate_args("data=jsonl", f"data.dir={audit.data}")[3:],
            f"output_dir={output_dir}"]  # fmt: skip
    done = audit.run(args)
    out.result, out.detail = audit.expect_error(done, "No space left on device: '")  # the file named
    leftovers = [str(p.relative_to(audit.work)) for p in output_dir.rglob("*") if ".tmp" in p.name]
    if out.result == "OK" and leftovers:
        out.result, out.detail = "WRONG", f"temporary files left behind: {leftovers}"


def case_empty_distilled_reuse(audit: Audit, out: Outcome) -> None:
    """An empty distilled.jsonl left by a failed warm-up is not reused: the warm-up samples again."""
    run_dir = audit.work / "empty-distilled"
    (run_dir / "warmup").mkdir(parents=True)
    (run_dir / "warmup" / "distilled.jsonl").write_text("")
    args = audit.train_args(audit.data, run_dir, "stage=warmup", "warmup.sample_limit=4", "warmup.num_samples=1")
    done = audit.run(args)
    if "sampling again" not in done.output:
        out.result, out.detail = "WRONG", "no sign that the empty distilled.jsonl was sampled again"
        if done.returncode != 0:
            out.detail += ": " + done.output.strip()[-300:]
        return
    if done.returncode == 0:
        out.result, out.detail = "OK", "sampled again and trained"
    else:
        out.result, out.detail = audit.expect_error(done, "warmup")


def case_missing_checkpoint_path(audit: Audit, out: Outcome) -> None:
    missing = audit.work / "nowhere.ckpt"
    done = audit.run(audit.train_args(audit.data, audit.work / "ckpt-missing", f"ckpt_path={missing}"))
    out.result, out.detail = audit.expect_error(done, "ckpt_path")


def case_positive_not_in_corpus(audit: Audit, out: Outcome) -> None:
    data = audit.data_copy("missing-positive")
    text = (data / "dev.jsonl").read_text().replace('"chess-2"', '"chess-99"')
    (data / "dev.jsonl").write_text(text)
    done = audit.run(audit.evaluate_args("data=jsonl", f"data.dir={data}", f"output_dir={audit.work / 'mp-out'}"))
    out.result, out.detail = audit.expect_error(done, "dev.jsonl:4", "chess-99")


def case_wrong_field_type(audit: Audit, out: Outcome) -> None:
    data = audit.data_copy("wrong-type")
    lines = (data / "train.jsonl").read_text().splitlines(keepends=True)
    row = json.loads(lines[4])
    lines[4] = json.dumps({**row, "question": 42}) + "\n"
    (data / "train.jsonl").write_text("".join(lines))
    done = audit.run(audit.train_args(data, audit.work / "wrong-type-run"))
    out.result, out.detail = audit.expect_error(done, "train.jsonl:5", "question")


def case_unknown_stage(audit: Audit, out: Outcome) -> None:
    done = audit.run(audit.train_args(audit.data, audit.work / "unknown-stage", "stage=finetune"))
    out.result, out.detail = audit.expect_error(done, "stage=finetune")


# name, expected outcome, case; the order matters: later cases reuse the interrupted run and adapter of the first
CASES: list[tuple[str, str, Callable[[Audit, Outcome], None]]] = [
    ("sigkill_resume_exact", "exact resume", case_sigkill_resume),
    ("sigterm_then_kill9_resume", "exact resume", case_sigterm_then_kill),
    ("mlflow_point_at_interruption", "exact resume", case_mlflow_points),
    ("last_ckpt_zero_byte", "error naming file and choices", damaged_checkpoint_case("zero_byte")),
    ("last_ckpt_random_bytes", "error naming file and choices", damaged_checkpoint_case("random")),
    ("last_ckpt_truncated", "error naming file and choices", damaged_checkpoint_case("truncated")),
    ("last_ckpt_bit_flipped", "error naming file and choices", damaged_checkpoint_case("bit_flipped")),
    ("resume_false_beside_damaged_ckpt", "exact resume", case_resume_false_beside_damaged),
    ("empty_train_rl", "error naming file", empty_split_case("rl", "")),
    ("blank_train_rl", "error naming file", empty_split_case("rl", "\n  \n\n")),
    ("empty_train_warmup", "error naming file", empty_split_case("warmup", "")),
    ("blank_train_warmup", "error naming file", empty_split_case("warmup", "\n  \n\n")),
    ("duplicate_ids_eval_split", "error naming file and line", case_duplicate_eval_ids),
    ("duplicate_ids_validation_split", "error naming file and line", case_duplicate_ids_in_training_validation),
    ("jsonl_without_dir_evaluate", "error naming setting", case_jsonl_without_dir_evaluate),
    ("jsonl_without_dir_train", "error naming setting", case_jsonl_without_dir_train),
    ("adapter_other_base", "error naming setting", case_adapter_other_base),
    ("adapter_wrong_shape", "error naming setting", case_adapter_wrong_shape),
    ("question_5mb", "success with a warning naming the turn", case_huge_question),
    ("malformed_line_600", "error naming file and line", case_malformed_deep_line),
    ("rl_group_size_1", "error naming setting", setting_case("rl.group_size=1", needle="rl.group_size")),
    ("rl_batch_size_0", "error naming setting", setting_case("rl.batch_size=0", needle="rl.batch_size")),
    ("rl_lr_negative", "error naming setting", setting_case("rl.lr=-1e-5", needle="rl.lr")),
    (
        "warmup_lr_negative",
        "error naming setting",
        setting_case("stage=warmup", "warmup.lr=-1e-4", needle="warmup.lr"),
    ),  # fmt: skip
    ("invalid_utf8_train", "error naming file and line", invalid_utf8_case("train.jsonl", 5, b"Moon", b"Mo\xffon")),
    ("invalid_utf8_dev", "error naming file and line", invalid_utf8_case("dev.jsonl", 2, b"glacier", b"gl\xc3(")),
    ("invalid_utf8_corpus", "error naming file and line", invalid_utf8_case("corpus.jsonl", 5, b"Moon", b"M\x80n")),
    ("index_empty_corpus", "error naming file", case_index_empty_corpus),
    ("index_folder_mode", "success, folders readable by others", case_index_folder_mode),
    ("full_disk", "error naming the fault, no temporary file", case_full_disk),
    ("empty_distilled_reuse", "samples again", case_empty_distilled_reuse),
    ("ckpt_path_missing", "error naming setting", case_missing_checkpoint_path),
    ("positive_not_in_corpus", "error naming file and line", case_positive_not_in_corpus),
    ("wrong_field_type", "error naming file and line", case_wrong_field_type),
    ("unknown_stage", "error naming setting", case_unknown_stage),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="where to write the JSON results")
    parser.add_argument("--only", nargs="*", help="run only these cases (the first case is run too when needed)")
    parser.add_argument("--timeout", type=float, default=300, help="seconds before a command counts as a hang")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (its path is printed)")
    args = parser.parse_args()
    names = [name for name, _, _ in CASES]
    unknown = sorted(set(args.only or ()) - set(names))
    if unknown:
        parser.error(f"unknown cases {unknown}; known: {', '.join(names)}")
    work = Path(tempfile.mkdtemp(prefix="cqr-audit-"))
    audit = Audit(work, args.timeout)
    outcomes = []
    started = time.time()
    needs_first = {"last_ckpt", "resume_false", "adapter_", "sigterm_then"}
    chosen = set(args.only or names)
    if any(name.startswith(tuple(needs_first)) for name in chosen):
        chosen.add(names[0])
    try:
        for name, expected, case in CASES:
            if name not in chosen:
                continue
            out = Outcome(name, expected)
            audit.commands = []
            begin = time.time()
            try:
                case(audit, out)
            except Exception as error:  # a failure of the audit itself, reported as such
                out.result, out.detail = "WRONG", f"audit error: {type(error).__name__}: {error}"
            out.seconds, out.commands = round(time.time() - begin, 1), audit.commands
            outcomes.append(out)
            print(f"{name:36s} {out.result:14s} {out.seconds:6.1f}s  {out.detail[:150]}", flush=True)
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    counts = {kind: sum(o.result == kind for o in outcomes) for kind in CLASSES}
    print("\n" + f"{'case':36s} {'expected':44s} result")
    for o in outcomes:
        print(f"{o.name:36s} {o.expected:44s} {o.result}")
    summary = ", ".join(f"{kind} {count}" for kind, count in counts.items())
    print(f"\n{len(outcomes)} cases in {time.time() - started:.0f} s: {summary}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    report = {"cases": [asdict(o) for o in outcomes], "counts": counts, "seconds": round(time.time() - started)}
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    raise SystemExit(0 if counts["OK"] == len(outcomes) else 1)


if __name__ == "__main__":
    main()
