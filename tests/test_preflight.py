"""Pre-flight: every bad input named with file and line, every impossible setting named, before a model loads."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf
from test_evaluate import evaluate_cfg
from test_train_e2e import compose_train, tiny_overrides

import train
from cqr_lightning.errors import ConfigError, DataError
from cqr_lightning.evaluate import run_evaluation
from cqr_lightning.preflight import check_settings, check_split, check_training_inputs, corpus_ids
from cqr_lightning.readers import iter_json_array, read_jsonl_turns, read_trec_qrels
from cqr_lightning.retrieval.corpus import read_corpus

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def data_dir(fixture_data_dir, tmp_path) -> Path:
    """A private copy of the fixture data that a test may damage."""
    folder = tmp_path / "data"
    folder.mkdir()
    for name in ("corpus.jsonl", "train.jsonl", "dev.jsonl"):
        (folder / name).write_bytes((fixture_data_dir / name).read_bytes())
    return folder


def train_cfg(data_dir: Path, tmp_path: Path, *extra: str):
    return compose_train([*tiny_overrides(data_dir, tmp_path / "run", tmp_path / "mlflow.db"), *extra])


def lines_of(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True)


def damage_line(path: Path, number: int, old: bytes, new: bytes) -> None:
    lines = lines_of(path)
    assert old in lines[number - 1]
    lines[number - 1] = lines[number - 1].replace(old, new, 1)
    path.write_bytes(b"".join(lines))


# ------------------------------------------------------------------------------------------- invalid UTF-8


def test_invalid_utf8_in_a_turn_file_names_file_line_and_byte(data_dir):
    damage_line(data_dir / "train.jsonl", 3, b"highest", b"high\xffest")
    with pytest.raises(DataError, match=r"train.jsonl:3: invalid UTF-8 \(byte 0xff at column \d+\)"):
        list(read_jsonl_turns(data_dir / "train.jsonl"))


def test_invalid_utf8_in_the_corpus_names_file_and_line(data_dir):
    damage_line(data_dir / "corpus.jsonl", 5, b"Curie", b"Cur\xc3\x28ie")  # a broken two-byte sequence
    with pytest.raises(DataError, match=r"corpus.jsonl:5: invalid UTF-8 \(byte 0xc3"):
        list(read_corpus(data_dir / "corpus.jsonl"))


def test_invalid_utf8_in_a_json_array_and_in_qrels_names_the_line(tmp_path, monkeypatch):
    import cqr_lightning.readers as readers

    monkeypatch.setattr(readers, "_CHUNK_CHARS", 5)  # the bad byte lies in a later chunk than the first
    array = tmp_path / "turns.json"
    array.write_bytes(b'[\n  {"Question": "a"},\n  {"Question": "b\xe9"}\n]\n')
    with pytest.raises(DataError, match=r"turns.json:3: invalid UTF-8 \(byte 0xe9"):
        list(iter_json_array(array))
    qrels = tmp_path / "qrels.txt"
    qrels.write_bytes(b"q1 0 p1 1\nq2 0 p\x802 1\n")
    with pytest.raises(DataError, match=r"qrels.txt:2: invalid UTF-8 \(byte 0x80 at column 7\)"):
        read_trec_qrels(qrels)


def test_valid_non_ascii_text_is_read_unchanged(data_dir):
    path = data_dir / "train.jsonl"
    damage_line(path, 1, b"longest", "längste – 最长".encode())
    assert next(read_jsonl_turns(path)).question == "What is the längste – 最长 river in Africa?"


def test_an_escape_spelling_half_a_surrogate_pair_is_named(data_dir):
    damage_line(data_dir / "train.jsonl", 2, b"delta", b"delta \\ud800")
    with pytest.raises(DataError, match="train.jsonl:2: .*unpaired UTF-16 surrogate"):
        list(read_jsonl_turns(data_dir / "train.jsonl"))


# ----------------------------------------------------------------------------------------- splits, corpus


def test_the_fixture_passes(data_dir, tmp_path):
    check_training_inputs(train_cfg(data_dir, tmp_path))


def test_a_repeated_turn_id_names_both_lines(data_dir, tmp_path):
    path = data_dir / "train.jsonl"
    lines = lines_of(path)
    path.write_bytes(b"".join([*lines, lines[1]]))
    cfg = train_cfg(data_dir, tmp_path)
    with pytest.raises(DataError, match=rf"train.jsonl:{len(lines) + 1}: turn id 'nile_2' appears more than once "):
        check_split(cfg.data, "train", corpus_ids(cfg.data))
    with pytest.raises(DataError, match=r"\(lines 2, 9\)"):
        check_training_inputs(cfg)


def test_a_positive_missing_from_the_corpus_is_named(data_dir, tmp_path):
    damage_line(data_dir / "dev.jsonl", 2, b'"bee-2"', b'"bee-99"')
    with pytest.raises(DataError, match=r"dev.jsonl:2: turn 'bee_2': positive passage id 'bee-99' is not in"):
        check_training_inputs(train_cfg(data_dir, tmp_path))


def test_an_empty_split_is_an_error(data_dir, tmp_path):
    (data_dir / "train.jsonl").write_text("\n\n")
    with pytest.raises(DataError, match="train.jsonl: split 'train' holds no turn"):
        check_training_inputs(train_cfg(data_dir, tmp_path))


def test_holdout_splits_are_read_as_turn_reader_resolves_them(data_dir, tmp_path):
    cfg = train_cfg(data_dir, tmp_path, "data.val_split=holdout_val", "data.holdout.val=0.5")
    check_training_inputs(cfg)
    with pytest.raises(ConfigError, match="data.holdout.val"):
        check_training_inputs(train_cfg(data_dir, tmp_path, "data.val_split=holdout_val"))
    lines = lines_of(data_dir / "train.jsonl")
    (data_dir / "train.jsonl").write_bytes(b"".join([*lines, lines[0]]))  # in whichever part its conversation is
    with pytest.raises(DataError, match=r"turn id 'nile_1' appears more than once \(lines 1, 9\)"):
        check_training_inputs(cfg)


def test_the_pipeline_reads_its_evaluation_splits_up_front(data_dir, tmp_path):
    (data_dir / "extra.jsonl").write_bytes(b'{"id": "x"}\n')
    with pytest.raises(DataError, match="extra.jsonl:1: missing field 'history'"):
        check_training_inputs(train_cfg(data_dir, tmp_path, "eval.splits=[dev,extra]"))
    check_training_inputs(train_cfg(data_dir, tmp_path, "stage=rl", "eval.splits=[dev,extra]"))  # not read by RL


def test_a_missing_split_file_names_the_setting_that_asks_for_it(data_dir, tmp_path):
    with pytest.raises(DataError, match=r"missing.jsonl: file not found: eval.splits asks for split 'missing'"):
        check_training_inputs(train_cfg(data_dir, tmp_path, "eval.splits=[dev,missing]"))
    (data_dir / "dev.jsonl").unlink()
    with pytest.raises(DataError, match=r"dev.jsonl: file not found: data.eval_split asks for split 'dev'"):
        check_training_inputs(train_cfg(data_dir, tmp_path))
    with pytest.raises(DataError, match=r"dev.jsonl: file not found: data.val_split asks for split 'dev'"):
        check_training_inputs(train_cfg(data_dir, tmp_path, "data.val_split=dev", "eval.splits=[train]"))


def test_an_empty_corpus_is_an_error(data_dir, tmp_path):
    (data_dir / "corpus.jsonl").write_text("")
    with pytest.raises(DataError, match="corpus.jsonl: the corpus holds no passage"):
        check_training_inputs(train_cfg(data_dir, tmp_path))


def test_a_missing_corpus_names_the_setting_to_change(tmp_path):
    """A clone not beside the data pack (experiment=pack_smollm2's default folder) learns which key to set."""
    with pytest.raises(DataError, match=r"missing/corpus.jsonl: corpus file not found: set data\.dir=FOLDER"):
        check_training_inputs(train_cfg(tmp_path / "missing", tmp_path))


def test_rl_on_an_empty_training_split_stops_before_loading_a_model(data_dir, tmp_path):
    """It used to spin forever: Lightning loops over empty epochs until max_steps, which never comes."""
    (data_dir / "train.jsonl").write_text("")
    cfg = train_cfg(data_dir, tmp_path, "stage=rl")
    with pytest.raises(DataError, match="split 'train' holds no turn"):
        train.run(cfg)
    assert not (tmp_path / "run" / "rl").exists()


def test_evaluation_names_a_bad_line_before_rewriting(data_dir, tmp_path):
    damage_line(data_dir / "dev.jsonl", 3, b"invented", b"inv\xfeented")
    cfg = evaluate_cfg(data_dir, tmp_path / "out", tmp_path / "mlflow.db", "rewriter=raw")
    with pytest.raises(DataError, match=r"dev.jsonl:3: invalid UTF-8"):
        run_evaluation(cfg)
    assert not (tmp_path / "out").exists()


def test_index_command_refuses_an_empty_corpus(tmp_path):
    (tmp_path / "corpus.jsonl").write_text("\n")
    command = [sys.executable, "-m", "cqr_lightning.index", "retriever=bm25s", f"data.dir={tmp_path}"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "CQR_CACHE_DIR": str(tmp_path / "cache")}
    env.pop("HYDRA_FULL_ERROR", None)
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "corpus.jsonl: the corpus holds no passage" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "cache").exists()


# --------------------------------------------------------------------------------------------- settings


@pytest.mark.parametrize(
    "override, message",
    [
        ("rl.group_size=1", "rl.group_size=1 must be at least 2"),
        ("rl.batch_size=0", "rl.batch_size=0 must be a positive number"),
        ("rl.micro_batch_size=-1", "rl.micro_batch_size=-1 must be a positive number"),
        ("rl.lr=0", "rl.lr=0 must be a positive number"),
        ("warmup.batch_size=0", "warmup.batch_size=0 must be a positive number"),
        ("warmup.lr=-1e-4", "warmup.lr=-0.0001 must be a positive number"),
        ("rl.generation_batch_size=0", "rl.generation_batch_size=0 must be a positive integer or null"),
        ("rl.micro_batch_tokens=0.5", "rl.micro_batch_tokens=0.5 must be a positive integer or null"),
    ],
)
def test_impossible_settings_are_named(data_dir, tmp_path, override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        check_training_inputs(train_cfg(data_dir, tmp_path, override))


def test_only_the_settings_of_the_stages_that_run_are_checked(data_dir, tmp_path):
    check_training_inputs(train_cfg(data_dir, tmp_path, "stage=warmup", "rl.group_size=1"))
    check_training_inputs(train_cfg(data_dir, tmp_path, "pipeline.warmup=false", "warmup.lr=0"))
    check_settings(OmegaConf.create({"rewriter": {"name": "raw"}}), ["rewriter"])
    with pytest.raises(ConfigError, match="rewriter.batch_size=0"):
        check_settings(OmegaConf.create({"rewriter": {"batch_size": 0}}), ["rewriter"])


def test_corpus_ids_are_read_once_while_the_file_is_unchanged(data_dir, tmp_path):
    cfg = train_cfg(data_dir, tmp_path)
    first = corpus_ids(cfg.data)
    assert corpus_ids(cfg.data) is first
    with (data_dir / "corpus.jsonl").open("a") as handle:
        handle.write(json.dumps({"id": "new-1", "contents": "New passage."}) + "\n")
    assert "new-1" in corpus_ids(cfg.data)


# ------------------------------------------------------------------------------------------- paths


def test_experiment_data_path_does_not_depend_on_the_working_folder(tmp_path):
    """A config file's data path is anchored at the project (`${project_dir:}`), so the pack experiment reads the
    same files whichever folder the command starts from."""
    printed = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "experiment=pack_smollm2", "--cfg", "job", "--resolve"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    data_dir = Path(OmegaConf.create(printed).data.dir)
    assert data_dir.is_absolute()
    assert data_dir.resolve() == (ROOT.parent / "shared" / "data" / "convsearch-pack").resolve()


def test_jsonl_data_without_a_folder_stops_instead_of_reading_the_demo(tmp_path):
    """`data=jsonl` inherits the demo group's keys; without `data.dir` it must stop naming the setting, not score
    the embedded demo conversations."""
    from hydra import compose, initialize_config_dir
    from omegaconf.errors import InterpolationResolutionError

    overrides = ["data=jsonl", "rewriter=raw", "logger=none", f"output_dir={tmp_path / 'out'}"]
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="evaluate", overrides=overrides)
    with pytest.raises(InterpolationResolutionError, match=r"data=jsonl needs data\.dir=FOLDER"):
        run_evaluation(cfg)
    assert not (tmp_path / "out" / "metrics.json").exists()
