"""The real entry point, composed from the real configs, on the fixture data with the tiny model."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import train
from callbacks.training_curves import read_curves
from cqr_lightning.config import compose_train_config as compose_train
from cqr_lightning.errors import ConfigError
from cqr_lightning.pipeline_tables import BEST_ROW, slug
from cqr_lightning.rewriter_card import read_card

ROOT = Path(__file__).resolve().parent.parent


def tiny_overrides(data_dir: Path, run_dir: Path, tracking: Path) -> list[str]:
    return [
        "model=tiny",
        "data=jsonl",
        f"data.dir={data_dir}",
        f"run_dir={run_dir}",
        f"logger.tracking_uri=sqlite:///{tracking}",
        f"logger.artifact_location={tracking.parent / 'artifacts'}",
        "trainer.accelerator=cpu",
        "rl.max_steps=3",
        "rl.batch_size=2",
        "rl.group_size=2",
        "rl.max_new_tokens=12",
        "rl.micro_batch_size=2",
        "rl.val_limit=2",
        "rl.val_every_n_steps=2",
        "rl.checkpoint_every_n_steps=1",
        "rl.table_every_n_steps=1",
        "warmup.max_new_tokens=12",
        "warmup.val_limit=2",
        "warmup.batch_size=2",
        "warmup.epochs=1",
        "eval.rewriter.max_new_tokens=12",
    ]


def mlflow_runs(tracking: Path):
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tracking}")
    experiment = client.get_experiment_by_name("cqr-lightning")
    return client, client.search_runs([experiment.experiment_id])


@pytest.mark.slow
def test_pipeline_from_the_base_model_writes_adapter_table_and_mlflow_runs(fixture_data_dir, tmp_path):
    tracking = tmp_path / "mlruns" / "mlflow.db"
    overrides = [*tiny_overrides(fixture_data_dir, tmp_path / "run", tracking), "pipeline.warmup=false"]
    cfg = compose_train([*overrides, "eval.splits=[dev,train]", "inference.num_samples=2"])
    tables = train.run(cfg)
    run_dir = tmp_path / "run"
    assert list(tables) == ["dev", "train"]
    rows = tables["dev"]
    assert list(rows) == ["raw question", "human rewrite", "untuned model", "after GRPO"]
    assert rows["raw question"]["n"] == 4 and tables["train"]["raw question"]["n"] == 8
    assert json.loads((run_dir / "eval" / "summary.json").read_text()) == tables
    assert (run_dir / "eval" / "train" / "after_grpo" / "rewrites.jsonl").is_file()
    adapter = run_dir / "rl" / "adapter"
    assert (adapter / "adapter_model.safetensors").is_file() and (adapter / "adapter_config.json").is_file()
    assert all("lora_" in key for key in load_file(adapter / "adapter_model.safetensors"))
    assert (run_dir / "rl" / "checkpoints" / "last.ckpt").is_file()
    assert (run_dir / "rl" / "best_adapter" / "adapter_model.safetensors").is_file()
    assert (run_dir / "rl" / "curves.png").is_file()
    for folder in (adapter, run_dir / "rl" / "best_adapter"):  # self-describing: card and tokenizer beside weights
        card = read_card(folder)
        assert card["base_model"]["name_or_path"] == "tiny" and card["prompt"]["max_new_tokens"] == 12
        assert card["prompt"]["response_format"] == cfg.response_format and (folder / "tokenizer.json").is_file()
        assert card["inference"] == {"num_samples": 2, "temperature": 1.0}  # how `evaluate` will ask it

    client, runs = mlflow_runs(tracking)
    by_stage = {}
    for run in runs:
        by_stage.setdefault(run.data.tags["stage"], []).append(run)
    assert len(by_stage["pipeline"]) == 1 and len(by_stage["rl"]) == 1
    assert len(by_stage["evaluate"]) == 8  # one per table row and split
    (parent,) = by_stage["pipeline"]
    parent_id = parent.info.run_id
    assert json.loads((run_dir / "mlflow_parent.json").read_text())["run_id"] == parent_id
    for run in runs:  # every run nested under the pipeline's, tagged with its folder, and ended
        assert run.data.tags["run_dir"] == str(run_dir.resolve()) and run.info.status == "FINISHED"
        assert run.data.tags.get("mlflow.parentRunId") == (None if run is parent else parent_id)
    assert {(r.data.tags["eval_split"], r.data.tags["eval_row"]) for r in by_stage["evaluate"]} == {
        (split, row) for split in ("dev", "train") for row in rows
    }
    parent_artifacts = {a.path for a in client.list_artifacts(parent_id)} | {
        a.path for a in client.list_artifacts(parent_id, "eval")
    }
    assert {"config.yaml", "eval/summary.json"} <= parent_artifacts
    logged_config = client.download_artifacts(parent_id, "config.yaml", str(tmp_path))
    assert "group_size: 2" in Path(logged_config).read_text() and "${" not in Path(logged_config).read_text()
    rl_run = by_stage["rl"][0]
    assert rl_run.data.params["rl.group_size"] == "2"
    curves = read_curves(run_dir / "rl" / "curves.csv")  # MLflow's steps are those of curves.csv and the plot
    for key in ("train/reward_mean", "val/mrr_at_3"):
        history = client.get_metric_history(rl_run.info.run_id, key)
        assert [(m.step, round(m.value, 6)) for m in history] == [(s, round(v, 6)) for s, v in curves[key]]
    assert [s for s, _ in curves["train/reward_mean"]] == [1, 2, 3] and [s for s, _ in curves["val/mrr_at_3"]] == [2]
    artifacts = {a.path for a in client.list_artifacts(rl_run.info.run_id)}
    assert {"adapter", "curves.png", "rollouts"} <= artifacts


@pytest.mark.slow
def test_warmup_stops_clearly_when_no_sample_is_kept(fixture_data_dir, tmp_path, caplog):
    tracking = tmp_path / "mlflow.db"
    overrides = [*tiny_overrides(fixture_data_dir, tmp_path / "run", tracking), "stage=pipeline"]
    cfg = compose_train([*overrides, "warmup.lenient_format=false"])
    with pytest.raises(ConfigError, match="self-distillation kept no sample.*raise warmup.num_samples"):
        train.run(cfg)
    _, runs = mlflow_runs(tracking)  # a failed call leaves no run RUNNING: the warm-up and its parent FAILED
    assert {run.data.tags["stage"]: run.info.status for run in runs} == {"pipeline": "FAILED", "warmup": "FAILED"}
    parent_id = json.loads((tmp_path / "run" / "mlflow_parent.json").read_text())["run_id"]
    stats_path = tmp_path / "run" / "warmup" / "distill_stats.json"
    stats = json.loads(stats_path.read_text())
    assert stats["turns"] == 8 and stats["kept"] == 0
    assert (tmp_path / "run" / "warmup" / "distilled.jsonl").read_text() == ""

    # the empty distilled.jsonl that run left is not reused: the rerun samples again
    stats_path.unlink()
    with caplog.at_level(logging.WARNING, logger="cqr_lightning.stages"), pytest.raises(ConfigError):
        train.run(cfg)
    assert "is empty (left by an earlier run that kept nothing): sampling again" in caplog.text
    assert json.loads(stats_path.read_text())["turns"] == 8
    _, runs = mlflow_runs(tracking)  # the rerun resumed the same parent run
    assert [run.info.run_id for run in runs if run.data.tags["stage"] == "pipeline"] == [parent_id]
    assert [run.info.status for run in runs] == ["FAILED"] * 3


@pytest.mark.slow
def test_warmup_that_samples_no_turn_says_the_training_split_is_empty(fixture_data_dir, tmp_path):
    overrides = [*tiny_overrides(fixture_data_dir, tmp_path / "run", tmp_path / "mlflow.db"), "stage=warmup"]
    with pytest.raises(ConfigError, match="kept no sample .*: the training split is empty .*warmup.sample_limit=0"):
        train.run(compose_train([*overrides, "warmup.sample_limit=0"]))


@pytest.mark.slow
def test_warmup_keeps_turns_the_question_solves_with_the_question_when_set(fixture_data_dir, tmp_path):
    overrides = [*tiny_overrides(fixture_data_dir, tmp_path / "run", tmp_path / "mlflow.db"), "stage=warmup"]
    setting = ["response_format=rewrite_only", "warmup.solved_turn_target=question", "warmup.validate_before=false"]
    train.run(compose_train([*overrides, *setting]))
    stage_dir = tmp_path / "run" / "warmup"
    questions = {row["id"]: row["question"] for row in map(json.loads, (fixture_data_dir / "train.jsonl").open())}
    kept = [json.loads(line) for line in (stage_dir / "distilled.jsonl").open()]
    # every fixture training question ranks its gold passage first, so the tiny model's samples never matter
    assert {row["turn_id"]: row["rewrite"] for row in kept} == questions
    assert json.loads((stage_dir / "distill_stats.json").read_text())["question_targets"] == len(questions)
    assert (stage_dir / "adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.slow
def test_warmup_stage_trains_from_a_distilled_file(fixture_data_dir, tmp_path, caplog):
    run_dir = tmp_path / "run"
    (run_dir / "warmup").mkdir(parents=True)
    rows = [
        {
            "turn_id": f"t{i}",
            "prompt": f"Query: q{i}\nRewrite:",
            "response": "<think> a </think>\n<rewrite> b </rewrite>",
        }
        for i in range(4)
    ]
    (run_dir / "warmup" / "distilled.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    tracking = tmp_path / "mlflow.db"
    cfg = compose_train([*tiny_overrides(fixture_data_dir, run_dir, tracking), "stage=warmup"])
    with caplog.at_level(logging.INFO, logger="callbacks.training_curves"):
        adapter = train.run(cfg)
    assert (adapter / "adapter_model.safetensors").is_file()
    curves = run_dir / "warmup" / "curves.csv"  # the final validation, after fit: in the CSV, the log and the plot
    assert read_curves(curves)["val/mrr_at_3"][-1][0] == 2
    assert "step 2 validation: val/mrr_at_3=" in caplog.text
    assert (run_dir / "warmup" / "curves.png").stat().st_mtime_ns >= curves.stat().st_mtime_ns
    before = json.loads((run_dir / "warmup" / "val_before.json").read_text())
    after = json.loads((run_dir / "warmup" / "val_after.json").read_text())
    assert "val/mrr_at_3" in before and "val/mrr_at_3" in after
    client, runs = mlflow_runs(tracking)
    (warmup_run,) = [r for r in runs if r.data.tags.get("stage") == "warmup"]
    assert len(client.get_metric_history(warmup_run.info.run_id, "train/loss")) == 2  # 4 rows, batch 2, 1 epoch
    assert {"adapter", "best_adapter"} <= {a.path for a in client.list_artifacts(warmup_run.info.run_id)}


def train_command(data_dir: Path, run_dir: Path, tracking: Path, steps: int) -> list[str]:
    overrides = tiny_overrides(data_dir, run_dir, tracking)
    overrides = [o for o in overrides if not o.startswith(("rl.max_steps", "rl.val_every_n_steps"))]
    return [sys.executable, "train.py", "stage=rl", f"rl.max_steps={steps}", "rl.val_every_n_steps=1000", *overrides]


def checkpoint_step(path: Path) -> int:
    try:
        return int(torch.load(path, weights_only=True)["global_step"])
    except Exception:
        return -1


@pytest.mark.slow
def test_sigkill_mid_run_then_resume_matches_the_uninterrupted_run(fixture_data_dir, tmp_path):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    tracking = tmp_path / "mlflow.db"
    straight = tmp_path / "straight"
    subprocess.run(train_command(fixture_data_dir, straight, tracking, 6), cwd=ROOT, env=env, check=True,
                   capture_output=True, timeout=600)  # fmt: skip

    killed = tmp_path / "killed"
    command = train_command(fixture_data_dir, killed, tracking, 6)
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    last = killed / "rl" / "checkpoints" / "last.ckpt"
    deadline = time.time() + 300
    while time.time() < deadline and checkpoint_step(last) < 3 and process.poll() is None:
        time.sleep(0.05)
    assert process.poll() is None, "the run finished before it could be killed"
    process.send_signal(signal.SIGKILL)
    process.wait()
    step_at_kill = checkpoint_step(last)
    assert 3 <= step_at_kill < 6
    assert not (killed / "rl" / "adapter").exists()
    client, runs = mlflow_runs(tracking)
    (killed_run,) = [r for r in runs if r.data.tags.get("run_dir") == str(killed.resolve())]
    logged = {m.step for m in client.get_metric_history(killed_run.info.run_id, "train/reward_mean")}
    assert set(range(1, step_at_kill + 1)) <= logged, "every checkpointed step's point reached MLflow"

    subprocess.run(command, cwd=ROOT, env=env, check=True, capture_output=True, timeout=600)
    assert checkpoint_step(last) == 6
    expected = load_file(straight / "rl" / "adapter" / "adapter_model.safetensors")
    resumed = load_file(killed / "rl" / "adapter" / "adapter_model.safetensors")
    assert expected.keys() == resumed.keys()
    for key in expected:
        torch.testing.assert_close(resumed[key], expected[key], rtol=0, atol=0)

    client, runs = mlflow_runs(tracking)
    killed_runs = [r for r in runs if r.data.tags.get("run_dir") == str(killed.resolve())]
    assert len(killed_runs) == 1, "the resumed run logs into the same MLflow run"
    for key in ("train/reward_mean", "train/loss", "train/lr"):
        steps = [m.step for m in client.get_metric_history(killed_runs[0].info.run_id, key)]
        assert sorted(steps) == list(range(1, 7)), f"{key}: each step once, at the steps of curves.csv"


@pytest.mark.slow
def test_sigterm_stops_after_the_current_step_with_a_checkpoint_of_it(fixture_data_dir, tmp_path):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    run_dir = tmp_path / "run"
    # no periodic checkpoint: a last.ckpt can only come from the SIGTERM handling
    command = [*train_command(fixture_data_dir, run_dir, tmp_path / "mlflow.db", 6), "rl.checkpoint_every_n_steps=100"]
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    curves = run_dir / "rl" / "curves.csv"

    def steps_done() -> int:
        return curves.read_text().count("train/reward_mean") if curves.is_file() else 0

    deadline = time.time() + 300
    while time.time() < deadline and steps_done() < 2 and process.poll() is None:
        time.sleep(0.05)
    assert process.poll() is None, "the run finished before it could be stopped"
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 143, stderr[-3000:]
    last = run_dir / "rl" / "checkpoints" / "last.ckpt"
    stopped_at = checkpoint_step(last)
    assert 2 <= stopped_at < 6 and stopped_at == steps_done()
    assert not (run_dir / "rl" / "adapter").exists()
    _, runs = mlflow_runs(tmp_path / "mlflow.db")
    assert [run.info.status for run in runs] == ["KILLED"]

    subprocess.run(command, cwd=ROOT, env=env, check=True, capture_output=True, timeout=600)
    steps = [int(line.split(",")[0]) for line in curves.read_text().splitlines() if "train/reward_mean" in line]
    assert steps == list(range(1, 7)), "the rerun continues after the stopped step, redoing none"
    _, runs = mlflow_runs(tmp_path / "mlflow.db")
    assert [run.info.status for run in runs] == ["FINISHED"], "the same run, resumed and finished"
    assert (run_dir / "rl" / "adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.slow
def test_a_multirun_sweep_trains_each_job_in_its_own_run_dir(fixture_data_dir, tmp_path):
    sweep = tmp_path / "sweep"
    overrides = [o for o in tiny_overrides(fixture_data_dir, sweep, tmp_path / "mlflow.db") if "max_steps" not in o]
    command = [sys.executable, "train.py", "--multirun", "seed=0,1", "stage=rl", "rl.max_steps=1", "logger=none"]
    result = subprocess.run([*command, *overrides], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    for job, seed in enumerate((0, 1)):
        run_dir = sweep / str(job)
        assert (run_dir / "rl" / "adapter" / "adapter_model.safetensors").is_file()
        assert (run_dir / "settings.yaml").read_text().startswith(f"seed: {seed}\n")
        assert (run_dir / "train.log").is_file()


@pytest.mark.parametrize(
    "overrides",
    [
        [],
        ["experiment=paper"],
        ["experiment=pack_smollm2"],
        ["model=llama-3.2-3b", "retriever=dense", "retriever.model=PATH"],
        ["logger=none"],
    ],
)
def test_every_config_composes_and_validates(overrides):
    from cqr_lightning.models.loading import ModelConfig
    from cqr_lightning.retrieval.factory import parse_config

    cfg = compose_train(overrides)
    ModelConfig.from_cfg(cfg.model)
    parse_config(cfg.retriever)
    assert cfg.stage in train.STAGES and cfg.rl.group_size >= 2
    if overrides == ["experiment=paper"]:
        assert (cfg.response_format, cfg.rl.max_new_tokens, cfg.retriever.name) == ("think_rewrite", 1024, "bm25")
    if overrides == ["experiment=pack_smollm2"]:  # its table reports the adapter as its card will ask for it
        assert [dict(row) for row in cfg.eval.sampled_rows] == [dict(cfg.inference)]
        assert cfg.inference.num_samples > 1


def test_rl_turn_filter_writes_the_turns_it_leaves_out_and_refuses_to_leave_none(
    fixture_data_dir, data_with_vague_turns, tmp_path
):
    from cqr_lightning.errors import ConfigError
    from cqr_lightning.readers import read_jsonl_turns
    from cqr_lightning.stages import open_stage_retriever, skipped_rl_turns

    cfg = compose_train([*tiny_overrides(data_with_vague_turns, tmp_path / "run", tmp_path / "m.db")])
    turns = list(read_jsonl_turns(data_with_vague_turns / "train.jsonl"))
    first_turns = sorted(t.id for t in turns if not t.history)
    with open_stage_retriever(cfg) as retriever:
        ranks = retriever.best_gold_ranks([t.question for t in turns], [t.positives for t in turns], k=100)
        solved = sorted(t.id for t, rank in zip(turns, ranks, strict=True) if rank == 1 and t.history)
        assert solved and first_turns and len(solved) + len(first_turns) < len(turns)

        # first turns are searched as asked by default, so every GRPO sample of one would earn the same reward
        assert skipped_rl_turns(cfg, tmp_path, retriever) == frozenset(first_turns)
        cfg.search.first_turn_as_asked = False
        assert skipped_rl_turns(cfg, tmp_path, retriever) == frozenset()  # the paper: every turn
        cfg.rl.skip_turns_solved_at_rank = 1
        cfg.search.first_turn_as_asked = True
        assert skipped_rl_turns(cfg, tmp_path, retriever) == frozenset(solved + first_turns)
    written = json.loads((tmp_path / "skipped_turns.json").read_text())
    assert written == {
        "max_rank": 1,
        "turns": len(turns),
        "first_turns": len(first_turns),
        "solved": len(solved),
        "skipped": sorted(solved + first_turns),
    }

    # on the plain fixture every question already finds its gold passage first: nothing would be left to train on
    plain = compose_train([*tiny_overrides(fixture_data_dir, tmp_path / "run2", tmp_path / "m.db")])
    plain.rl.skip_turns_solved_at_rank = 1
    with (
        open_stage_retriever(plain) as retriever,
        pytest.raises(ConfigError, match="no training turn left.*turn one of them off"),
    ):
        skipped_rl_turns(plain, tmp_path / "all", retriever)


@pytest.mark.slow
def test_rl_with_the_turn_filter_trains_only_on_turns_the_question_does_not_solve(data_with_vague_turns, tmp_path):
    tracking = tmp_path / "mlruns" / "mlflow.db"
    overrides = [*tiny_overrides(data_with_vague_turns, tmp_path / "run", tracking), "stage=rl"]
    cfg = compose_train([*overrides, "rl.max_steps=2", "rl.skip_turns_solved_at_rank=1", "rl.val_every_n_steps=1000"])
    train.run(cfg)
    skipped = set(json.loads((tmp_path / "run" / "rl" / "skipped_turns.json").read_text())["skipped"])
    client, runs = mlflow_runs(tracking)
    (rl_run,) = [run for run in runs if run.data.tags.get("stage") == "rl"]
    trained = set()
    for step in (1, 2):
        path = client.download_artifacts(rl_run.info.run_id, f"rollouts/step_{step:06d}.json", str(tmp_path))
        table = json.loads(Path(path).read_text())
        trained |= {row[table["columns"].index("turn_id")] for row in table["data"]}
    assert trained == {"vague_1", "vague_2"} and not trained & skipped


def test_a_run_folder_refuses_other_settings_and_names_them(fixture_data_dir, tmp_path):
    from cqr_lightning.run_settings import SETTINGS_FILE, check_run_settings

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    base = tiny_overrides(fixture_data_dir, run_dir, tmp_path / "m.db")
    check_run_settings(compose_train(base), run_dir)
    assert (run_dir / SETTINGS_FILE).is_file()
    # the same recipe, reported elsewhere, checkpointed and validated differently: a resume, accepted
    same = [*base, "stage=rl", "data.eval_split=train", "rl.checkpoint_every_n_steps=7", "logger=none", "eval.limit=1"]
    check_run_settings(compose_train(same), run_dir)
    # laid out differently in memory (what an out-of-memory error asks to lower): the same recipe, accepted
    memory = ["rl.micro_batch_size=1", "model.gradient_checkpointing=false", "rl.logprob_chunk_size=4"]
    check_run_settings(compose_train([*base, *memory, "warmup.sampling_batch_size=1"]), run_dir)
    with pytest.raises(ConfigError, match=r"rl.lr: 5e-05 -> 0.001; rl.max_steps: 3 -> 8.*another run_dir"):
        check_run_settings(compose_train([*base, "rl.max_steps=8", "rl.lr=1e-3"]), run_dir)
    with pytest.raises(ConfigError, match="search.query_mode: 'question_rewrite' -> 'rewrite'"):
        check_run_settings(compose_train([*base, "search.query_mode=rewrite"]), run_dir)


@pytest.mark.slow
def test_a_kill_after_a_sigterm_resumes_from_the_newest_checkpoint_not_the_sigterm_one(fixture_data_dir, tmp_path):
    """After a SIGTERM before the first periodic checkpoint, Lightning writes its later 'last' as last-v1.ckpt;
    a kill -9 then must not send the rerun back to the step the SIGTERM saved."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    run_dir = tmp_path / "run"
    command = [*train_command(fixture_data_dir, run_dir, tmp_path / "mlflow.db", 6), "rl.checkpoint_every_n_steps=3"]
    folder = run_dir / "rl" / "checkpoints"
    curves = run_dir / "rl" / "curves.csv"

    def steps_logged() -> list[int]:
        text = curves.read_text() if curves.is_file() else ""
        return [int(line.split(",")[0]) for line in text.splitlines() if "train/reward_mean" in line]

    def run_until(condition) -> subprocess.Popen:
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 300
        while time.time() < deadline and not condition() and process.poll() is None:
            time.sleep(0.05)
        assert process.poll() is None, "the run finished before it could be stopped"
        return process

    first = run_until(lambda: len(steps_logged()) >= 1)
    first.send_signal(signal.SIGTERM)
    assert first.wait(timeout=300) == 143
    sigterm_step = checkpoint_step(folder / "last.ckpt")
    assert 1 <= sigterm_step < 3

    second = run_until(lambda: checkpoint_step(folder / "last-v1.ckpt") >= 3)
    second.send_signal(signal.SIGKILL)
    second.wait()
    newest = max(checkpoint_step(path) for path in folder.glob("*.ckpt"))
    assert newest >= 3 and checkpoint_step(folder / "last.ckpt") == sigterm_step
    before = steps_logged()

    subprocess.run(command, cwd=ROOT, env=env, check=True, capture_output=True, timeout=600)
    assert steps_logged()[len(before) :] == list(range(newest + 1, 7)), "the rerun continues from the newest step"
    assert (run_dir / "rl" / "adapter" / "adapter_model.safetensors").is_file()


def test_a_run_stopped_at_a_validation_step_validates_it_in_full_on_resume(fixture_data_dir, tmp_path, monkeypatch):
    """SIGTERM at the end of step 2, a validation step: Lightning checkpoints before that validation. The rerun
    validates step 2 before training on, and every later validation still scores every validation turn (a pass
    abandoned by Lightning's resume must not shorten the next one)."""
    from cqr_lightning.modules.policy import PolicyModule
    from cqr_lightning.modules.rl import RLModule

    run_dir = tmp_path / "run"
    kept = ("rl.max_steps", "rl.val_limit", "rl.val_every_n_steps", "rl.checkpoint_every_n_steps")
    overrides = [o for o in tiny_overrides(fixture_data_dir, run_dir, tmp_path / "mlflow.db") if not o.startswith(kept)]
    overrides += ["stage=rl", "rl.max_steps=4", "rl.val_every_n_steps=2", "rl.checkpoint_every_n_steps=100",
                  "rl.val_limit=4", "rl.val_batch_size=2", "data.val_split=dev"]  # fmt: skip
    validated, sent = [], []
    validation_step, training_step = PolicyModule.validation_step, RLModule.training_step

    def counting_validation_step(self, batch, batch_idx):
        validation_step(self, batch, batch_idx)
        validated.append((self.global_step, len(batch.turns)))

    def training_step_then_sigterm(self, batch, batch_idx):
        output = training_step(self, batch, batch_idx)
        if self.global_step == 2 and not sent:  # the step's optimizer step has run: this is the end of step 2
            sent.append(True)
            os.kill(os.getpid(), signal.SIGTERM)
        return output

    monkeypatch.setattr(PolicyModule, "validation_step", counting_validation_step)
    monkeypatch.setattr(RLModule, "training_step", training_step_then_sigterm)
    with pytest.raises(SystemExit):
        train.run(compose_train(overrides))
    assert validated == [], "stopped before step 2's validation"
    assert checkpoint_step(run_dir / "rl" / "checkpoints" / "last.ckpt") == 2

    train.run(compose_train(overrides))
    turns_per_validation = {step: sum(n for s, n in validated if s == step) for step, _ in validated}
    assert turns_per_validation == {2: 4, 4: 4}
    curves = (run_dir / "rl" / "curves.csv").read_text().splitlines()
    assert [int(line.split(",")[0]) for line in curves if ",val/mrr_at_3," in line] == [2, 4]
    assert [int(line.split(",")[0]) for line in curves if ",train/reward_mean," in line] == [1, 2, 3, 4]


def test_the_best_row_evaluates_the_adapter_of_the_best_validated_step(fixture_data_dir, tmp_path):
    run_dir = tmp_path / "run"
    overrides = [*tiny_overrides(fixture_data_dir, run_dir, tmp_path / "mlflow.db"), "pipeline.warmup=false"]
    overrides = [o for o in overrides if not o.startswith("rl.val_every_n_steps")]
    tables = train.run(
        compose_train([*overrides, "rl.val_every_n_steps=1", "eval.untuned_row=false", "eval.best_row=true"])
    )
    assert list(tables["dev"]) == ["raw question", "human rewrite", "after GRPO", BEST_ROW]
    best_step = json.loads((run_dir / "rl" / "best_adapter.json").read_text())["step"]
    curve = dict(read_curves(run_dir / "rl" / "curves.csv")["val/mrr_at_3"])
    assert curve[best_step] == max(curve.values())
    evaluated = (run_dir / "eval" / "dev" / slug(BEST_ROW) / "config.yaml").read_text()
    assert f"adapter: {run_dir / 'rl' / 'best_adapter'}" in evaluated


def test_sampled_rows_evaluate_the_grpo_adapter_with_several_rewrites_a_turn(fixture_data_dir, tmp_path):
    run_dir = tmp_path / "run"
    overrides = [*tiny_overrides(fixture_data_dir, run_dir, tmp_path / "mlflow.db"), "pipeline.warmup=false"]
    rows = "eval.sampled_rows=[{num_samples:3,temperature:0.7}]"
    tables = train.run(compose_train([*overrides, "eval.untuned_row=false", rows]))
    label = "after GRPO, 3 rewrites at T=0.7"
    assert list(tables["dev"]) == ["raw question", "human rewrite", "after GRPO", label]
    assert tables["dev"][label]["rewrites_per_turn"] == 3 and tables["dev"]["after GRPO"]["rewrites_per_turn"] == 1
    evaluated = (run_dir / "eval" / "dev" / slug(label) / "config.yaml").read_text()
    assert f"adapter: {run_dir / 'rl' / 'adapter'}" in evaluated and "num_samples: 3" in evaluated
