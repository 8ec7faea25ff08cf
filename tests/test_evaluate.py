"""`python -m cqr_lightning.evaluate` end to end: raw, history, human and a tiny in-process model."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from cqr_lightning.errors import ConfigError
from cqr_lightning.evaluate import run_evaluation
from cqr_lightning.metrics import METRIC_NAMES

ROOT = Path(__file__).resolve().parent.parent


def evaluate_cfg(data_dir: Path, out: Path, tracking: Path, *extra: str):
    overrides = [
        "data=jsonl",
        f"data.dir={data_dir}",
        f"output_dir={out}",
        f"logger.tracking_uri=sqlite:///{tracking}",
        f"logger.artifact_location={tracking.parent / 'artifacts'}",
        *extra,
    ]
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(config_name="evaluate", overrides=overrides)


def test_raw_and_human_rewrites(fixture_data_dir, tmp_path):
    tracking = tmp_path / "mlflow.db"
    raw = run_evaluation(evaluate_cfg(fixture_data_dir, tmp_path / "raw", tracking, "rewriter=raw"))
    human = run_evaluation(evaluate_cfg(fixture_data_dir, tmp_path / "human", tracking, "rewriter=human"))
    assert set(METRIC_NAMES) <= set(raw) and raw["n"] == 4
    # dev turn 2 of each conversation ("How many keys does it have?") is ambiguous without the rewrite
    assert human["mrr@3"] >= raw["mrr@3"]
    assert human["mrr@3"] == 1.0
    # the raw question is always a copy; the human rewrites leave the first turn of each conversation as asked
    assert raw["copy_rate"] == 1.0 and 0.0 < human["copy_rate"] < 1.0
    written = json.loads((tmp_path / "human" / "metrics.json").read_text())
    assert written["mrr@3"] == human["mrr@3"]
    rows = [json.loads(line) for line in (tmp_path / "human" / "rewrites.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and rows[0]["best_rank"] == 1 and rows[0]["query"]

    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tracking}")
    runs = client.search_runs([client.get_experiment_by_name("cqr-lightning").experiment_id])
    assert len(runs) == 2
    assert {r.data.params["rewriter.name"] for r in runs} == {"raw", "human"}
    assert all("eval/mrr_at_3" in r.data.metrics for r in runs)


def test_groups_json_holds_the_metrics_within_first_turns_later_turns_and_each_source(fixture_data_dir, tmp_path):
    from cqr_lightning.evaluation import TurnResult, summarize_groups, turn_groups
    from cqr_lightning.readers import read_jsonl_turns

    out = tmp_path / "raw"
    run_evaluation(evaluate_cfg(fixture_data_dir, out, tmp_path / "m.db", "rewriter=raw", "logger=none"))
    groups = json.loads((out / "groups.json").read_text())
    rows = {r["id"]: r for r in map(json.loads, (out / "rewrites.jsonl").read_text().splitlines())}
    turns = list(read_jsonl_turns(fixture_data_dir / "dev.jsonl"))
    first = [t.id for t in turns if not t.history]
    assert list(groups) == ["first turns", "later turns"], "one source in the fixture: no source groups"
    assert groups["first turns"]["n"] == len(first) and groups["later turns"]["n"] == len(turns) - len(first)
    assert groups["first turns"]["mrr@3"] == pytest.approx(sum(rows[i]["mrr@3"] for i in first) / len(first))
    sourced = [dataclasses.replace(t, source="a" if i % 2 else "b") for i, t in enumerate(turns)]
    assert list(turn_groups(sourced)) == ["first turns", "later turns", "source a", "source b"]
    results = [
        TurnResult(t.id, t.question, 1, [], dict.fromkeys(METRIC_NAMES, float(i % 2))) for i, t in enumerate(turns)
    ]
    by_source = summarize_groups(sourced, results)
    assert by_source["source b"]["n"] == 2 and by_source["source b"]["mrr@3"] == 0.0
    assert by_source["source a"]["mrr@3"] == 1.0 and by_source["source a"]["copy_rate"] == 0.0


def test_history_rewriter_uses_earlier_user_turns(fixture_data_dir, tmp_path):
    out = tmp_path / "history"
    cfg = evaluate_cfg(
        fixture_data_dir, out, tmp_path / "m.db", "rewriter=history", "search.query_mode=rewrite", "logger=none"
    )
    run_evaluation(cfg)
    rows = [json.loads(line) for line in (out / "rewrites.jsonl").read_text().splitlines()]
    assert rows[1]["query"] == "How do honey bees live? How do they share where food is?"
    assert rows[0]["as_asked"] and rows[0]["query"] == "How do honey bees live?"  # a first turn: the question


def test_saved_rewrites_are_searched_anew_in_another_query_mode(fixture_data_dir, tmp_path):
    """rewriter=file reads the rewrites an evaluation saved and searches them as `search.query_mode` says."""
    human = tmp_path / "human"
    run_evaluation(evaluate_cfg(fixture_data_dir, human, tmp_path / "m.db", "rewriter=human", "logger=none"))
    for mode in ("rewrite", "question_rewrite", "fusion"):
        out = tmp_path / mode
        extra = ("rewriter=file", f"rewriter.path={human / 'rewrites.jsonl'}", f"search.query_mode={mode}")
        metrics = run_evaluation(evaluate_cfg(fixture_data_dir, out, tmp_path / "m.db", *extra, "logger=none"))
        rows = [json.loads(line) for line in (out / "rewrites.jsonl").read_text().splitlines()]
        later = next(r for r in rows if not r["as_asked"])
        expected = {
            "rewrite": later["rewrite"],
            "question_rewrite": f"How do they share where food is? {later['rewrite']}",
            "fusion": f"How do they share where food is? || {later['rewrite']}",
        }
        assert metrics["query_mode"] == mode and later["query"] == expected[mode]
        assert json.loads((out / "metrics.json").read_text())["query_mode"] == mode


def test_human_rewriter_on_data_without_rewrites_names_the_fix(fixture_data_dir, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "corpus.jsonl").write_text((fixture_data_dir / "corpus.jsonl").read_text())
    rows = [json.loads(line) for line in (fixture_data_dir / "dev.jsonl").read_text().splitlines()]
    (data / "dev.jsonl").write_text("".join(json.dumps({**r, "rewrite": None}) + "\n" for r in rows))
    with pytest.raises(ConfigError, match="rewriter=human needs a human rewrite"):
        run_evaluation(evaluate_cfg(data, tmp_path / "o", tmp_path / "m.db", "rewriter=human", "logger=none"))


@pytest.mark.slow
def test_tiny_model_rewriter_through_the_command_line(fixture_data_dir, tmp_path):
    out = tmp_path / "model"
    command = [
        sys.executable, "-m", "cqr_lightning.evaluate", "data=jsonl", f"data.dir={fixture_data_dir}",
        "rewriter=model", "model=tiny", "rewriter.max_new_tokens=8", f"output_dir={out}",
        f"logger.tracking_uri=sqlite:///{tmp_path / 'm.db'}",
    ]  # fmt: skip
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "model / bm25s / question_rewrite / dev" in result.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n"] == 4 and 0.0 <= metrics["format_ok"] <= 1.0
    rows = [json.loads(line) for line in (out / "rewrites.jsonl").read_text().splitlines()]
    assert all("response" in row for row in rows)


def test_several_sampled_rewrites_are_searched_saved_and_scored_again_identically(fixture_data_dir, tmp_path):
    """rewriter.num_samples=3: every turn gets the greedy rewrite and two sampled ones, reproducibly from the seed;
    rewrites.jsonl keeps them, and rewriter=file searches them again to the same queries and figures."""
    sampled = ["rewriter=model", "model=tiny", "rewriter.max_new_tokens=8", "rewriter.response_format=rewrite_only",
               "rewriter.prefill_response=true", "rewriter.lenient_format=true", "logger=none"]  # fmt: skip
    db = tmp_path / "m.db"

    def rows(folder: Path) -> list[dict]:
        return [json.loads(line) for line in (folder / "rewrites.jsonl").read_text().splitlines()]

    greedy = run_evaluation(evaluate_cfg(fixture_data_dir, tmp_path / "g", db, *sampled))
    three = run_evaluation(evaluate_cfg(fixture_data_dir, tmp_path / "s", db, *sampled, "rewriter.num_samples=3"))
    again = run_evaluation(evaluate_cfg(fixture_data_dir, tmp_path / "a", db, *sampled, "rewriter.num_samples=3"))
    assert greedy["rewrites_per_turn"] == 1 and three["rewrites_per_turn"] == 3
    assert [r["rewrite"] for r in rows(tmp_path / "s")] == [r["rewrite"] for r in rows(tmp_path / "g")]
    assert all(len(r["samples"]) == 2 for r in rows(tmp_path / "s")) and "samples" not in rows(tmp_path / "g")[0]
    assert rows(tmp_path / "a") == rows(tmp_path / "s") and again == {**three, "seconds": again["seconds"]}
    later = [r for r in rows(tmp_path / "s") if not r["as_asked"]]
    assert later and all(len(r["query"].split(" || ")) == 3 for r in later)
    path = f"rewriter.path={tmp_path / 's' / 'rewrites.jsonl'}"
    rescored = run_evaluation(evaluate_cfg(fixture_data_dir, tmp_path / "f", db, "rewriter=file", path, "logger=none"))
    assert {k: rescored[k] for k in METRIC_NAMES} == {k: three[k] for k in METRIC_NAMES}
    assert [r["query"] for r in rows(tmp_path / "f")] == [r["query"] for r in rows(tmp_path / "s")]


def test_shared_prefill_draws_the_samples_with_one_prefill_a_turn(fixture_data_dir, tmp_path, monkeypatch):
    """rewriter.shared_prefill=true: the sampled rewrites come from the decoding loop, which prefills each turn's
    prompt once for its samples; near zero temperature they are the greedy rewrite."""
    from cqr_lightning.models import decode_loop

    prefills = []
    real_prefill = decode_loop.shared_prefill

    def counted(model, input_ids, attention_mask, cache, copies):
        prefills.append((input_ids.shape[0], copies))
        return real_prefill(model, input_ids, attention_mask, cache, copies)

    monkeypatch.setattr(decode_loop, "shared_prefill", counted)
    settings = ["rewriter=model", "model=tiny", "rewriter.max_new_tokens=8", "rewriter.response_format=rewrite_only",
                "rewriter.prefill_response=true", "rewriter.lenient_format=true", "logger=none",
                "rewriter.num_samples=3", "rewriter.temperature=0.0001", "rewriter.shared_prefill=true"]  # fmt: skip
    metrics = run_evaluation(evaluate_cfg(fixture_data_dir, tmp_path / "s", tmp_path / "m.db", *settings))
    rows = [json.loads(line) for line in (tmp_path / "s" / "rewrites.jsonl").read_text().splitlines()]
    assert metrics["rewrites_per_turn"] == 3 and prefills, "the samples went through the loop"
    assert all(copies == 2 for _, copies in prefills) and sum(n for n, _ in prefills) == len(rows)
    assert all(row["samples"] == [row["rewrite"]] * 2 for row in rows)


@pytest.mark.parametrize("setting", ["rewriter.num_samples=0", "rewriter.temperature=0"])
def test_unusable_sampling_settings_stop_before_the_model_loads(fixture_data_dir, tmp_path, setting, monkeypatch):
    import cqr_lightning.models.loading as loading

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the settings were checked")

    monkeypatch.setattr(loading, "load_tokenizer", no_load)
    cfg = evaluate_cfg(fixture_data_dir, tmp_path / "o", tmp_path / "m.db", "rewriter=model", "model=tiny", setting)
    with pytest.raises(ConfigError, match="rewriter.num_samples must be >= 1 and rewriter.temperature > 0"):
        run_evaluation(cfg)


def test_saved_samples_that_are_not_a_list_of_strings_name_the_file_and_line(fixture_data_dir, tmp_path):
    from cqr_lightning.errors import DataError

    ids = [json.loads(line)["id"] for line in (fixture_data_dir / "dev.jsonl").read_text().splitlines()]
    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join(json.dumps({"id": i, "rewrite": "q", "samples": "not a list"}) + "\n" for i in ids))
    cfg = evaluate_cfg(fixture_data_dir, tmp_path / "o", tmp_path / "m.db", "rewriter=file", f"rewriter.path={bad}")
    with pytest.raises(DataError, match=f"{bad}:1: .*samples"):
        run_evaluation(cfg)


@pytest.mark.slow
def test_a_trained_adapter_evaluates_on_another_turn_file_with_one_command(fixture_data_dir, tmp_path, monkeypatch):
    import torch

    from cqr_lightning.models.loading import ModelConfig, load_policy, save_adapter

    monkeypatch.setenv("CQR_CACHE_DIR", str(tmp_path / "cache"))
    policy = load_policy(ModelConfig.from_cfg({"name_or_path": "tiny", "load_in_4bit": False}))
    with torch.no_grad():  # a fresh LoRA is a no-op (B = 0): move it so the adapter changes what the model writes
        for name, weight in policy.named_parameters():
            if "lora_B" in name:
                weight.normal_(std=0.5, generator=torch.Generator().manual_seed(0))
    adapter = save_adapter(policy, tmp_path / "adapter")
    other = tmp_path / "elsewhere" / "my_turns.jsonl"  # not <data.dir>/<split>.jsonl
    other.parent.mkdir()
    other.write_text("".join((fixture_data_dir / "train.jsonl").read_text().splitlines(keepends=True)[:5]))

    def evaluate(out: Path, *extra: str) -> list[dict]:
        command = [
            sys.executable, "-m", "cqr_lightning.evaluate", "data=jsonl", f"data.dir={fixture_data_dir}",
            f"data.eval_split={other}", "rewriter=model", "model=tiny", "model.load_in_4bit=false",
            "rewriter.max_new_tokens=8", f"output_dir={out}", "logger=none", *extra,
        ]  # fmt: skip
        result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
        assert json.loads((out / "metrics.json").read_text())["n"] == 5
        return [json.loads(line) for line in (out / "rewrites.jsonl").read_text().splitlines()]

    tuned = evaluate(tmp_path / "tuned", f"model.adapter={adapter}")
    base = evaluate(tmp_path / "base")
    assert [row["id"] for row in tuned] == [json.loads(line)["id"] for line in other.read_text().splitlines()]
    assert [row["response"] for row in tuned] != [row["response"] for row in base]


def test_saved_rewrites_scored_again_give_the_same_queries_and_figures(fixture_data_dir, tmp_path):
    saved, again, db = tmp_path / "human", tmp_path / "again", tmp_path / "m.db"
    human = run_evaluation(evaluate_cfg(fixture_data_dir, saved, db, "rewriter=human", "logger=none"))
    path = f"rewriter.path={saved / 'rewrites.jsonl'}"
    rescored = run_evaluation(evaluate_cfg(fixture_data_dir, again, db, "rewriter=file", path, "logger=none"))
    assert {k: rescored[k] for k in METRIC_NAMES} == {k: human[k] for k in METRIC_NAMES}
    queries = [json.loads(line)["query"] for line in (again / "rewrites.jsonl").read_text().splitlines()]
    assert queries == [json.loads(line)["query"] for line in (saved / "rewrites.jsonl").read_text().splitlines()]


def test_saved_rewrites_missing_a_turn_or_malformed_name_the_file_and_line(fixture_data_dir, tmp_path):
    from cqr_lightning.errors import DataError

    rows = [json.loads(line) for line in (fixture_data_dir / "dev.jsonl").read_text().splitlines()]
    short = tmp_path / "short.jsonl"
    short.write_text("".join(json.dumps({"id": r["id"], "query": r["question"]}) + "\n" for r in rows[:-1]))
    cfg = evaluate_cfg(fixture_data_dir, tmp_path / "o", tmp_path / "m.db", "rewriter=file", f"rewriter.path={short}")
    with pytest.raises(DataError, match=f"{short}: no query for 1 evaluated turn"):
        run_evaluation(cfg)
    broken = tmp_path / "broken.jsonl"
    broken.write_text(json.dumps({"id": "x", "query": "q"}) + "\n{not json\n")
    cfg = evaluate_cfg(fixture_data_dir, tmp_path / "o", tmp_path / "m.db", "rewriter=file", f"rewriter.path={broken}")
    with pytest.raises(DataError, match=f"{broken}:2: malformed JSON"):
        run_evaluation(cfg)


def read_trec_means(folder: Path, measures: set[str], cut: int | None = None) -> dict[str, float]:
    """trec_eval's means (through pytrec_eval) from run.trec and qrels.trec alone; a judged query absent from the
    run counts 0, as in metrics.json. `cut` keeps each query's first `cut` ranks."""
    import pytrec_eval

    qrels: dict[str, dict[str, int]] = {}
    for line in (folder / "qrels.trec").read_text().splitlines():
        qid, _, docid, relevance = line.split()
        qrels.setdefault(qid, {})[docid] = int(relevance)
    run: dict[str, dict[str, float]] = {}
    for line in (folder / "run.trec").read_text().splitlines():
        qid, _, docid, rank, score, _ = line.split()
        if cut is None or int(rank) <= cut:
            run.setdefault(qid, {})[docid] = float(score)
    per_query = pytrec_eval.RelevanceEvaluator(qrels, measures).evaluate(run)
    return {m: sum(per_query.get(q, {}).get(m, 0.0) for q in qrels) / len(qrels) for m in measures}


# queries that rank the dev turns' gold passages second, low, or not at all
POOR_QUERIES = {"bee_1": "bee dance", "bee_2": "honey colonies queen", "piano_1": "Tokyo tower", "piano_2": "piano"}


@pytest.mark.parametrize(("rewriter", "query_mode"), [("file", "rewrite"), ("history", "fusion"), ("file", "fusion")])
def test_trec_run_and_qrels_give_the_figures_of_metrics_json(fixture_data_dir, tmp_path, rewriter, query_mode):
    from cqr_lightning.retrieval.factory import open_retriever

    out = tmp_path / query_mode
    extra = [f"rewriter={rewriter}", f"search.query_mode={query_mode}", "logger=none"]
    if rewriter == "file":
        poor = tmp_path / "poor.jsonl"
        poor.write_text("".join(json.dumps({"id": i, "rewrite": q}) + "\n" for i, q in POOR_QUERIES.items()))
        extra += [f"rewriter.path={poor}", "search.first_turn_as_asked=false"]
    cfg = evaluate_cfg(fixture_data_dir, out, tmp_path / "m.db", *extra)
    metrics = run_evaluation(cfg)
    if rewriter == "file" and query_mode == "rewrite":
        assert metrics["mrr"] < 0.9 and metrics["recall@10"] < 1.0  # figures worth comparing
    trec = read_trec_means(out, {"recip_rank", "ndcg_cut_3", "recall_10", "recall_100"})
    expected = {"recip_rank": "mrr", "ndcg_cut_3": "ndcg@3", "recall_10": "recall@10", "recall_100": "recall@100"}
    for measure, name in expected.items():
        assert trec[measure] == pytest.approx(metrics[name], abs=1e-6), measure
    assert read_trec_means(out, {"recip_rank"}, cut=3)["recip_rank"] == pytest.approx(metrics["mrr@3"], abs=1e-6)
    assert (out / "qrels.trec").read_text().splitlines()[0] == "bee_1 0 bee-1 1"

    lines = [line.split() for line in (out / "run.trec").read_text().splitlines()]
    assert {len(parts) for parts in lines} == {6} and {parts[5] for parts in lines} == {f"cqr_{rewriter}_{query_mode}"}
    rows = [json.loads(line) for line in (out / "rewrites.jsonl").read_text().splitlines()]
    second = rows[1]  # "How do they share where food is?", after a first turn
    written = [(parts[2], float(parts[4])) for parts in lines if parts[0] == second["id"]]
    assert [int(parts[3]) for parts in lines if parts[0] == second["id"]] == list(range(1, len(written) + 1))
    assert [pid for pid, _ in written[:10]] == second["top10"]
    assert all(a[1] > b[1] for a, b in zip(written, written[1:], strict=False))  # strictly decreasing
    with open_retriever(cfg.retriever, cfg.data.corpus) as retriever:
        if query_mode == "rewrite":
            hits = retriever.search([second["query"]], k=100)[0]
            assert written[0] == (hits[0].passage_id, hits[0].score)  # the retriever's own score
        else:
            question, rewrite = second["query"].split(" || ")
            rankings = retriever.search([question, rewrite], k=100)
            fused = sum(
                1 / (60 + rank)
                for ranking in rankings
                for rank, hit in enumerate(ranking, start=1)
                if hit.passage_id == written[0][0]
            )
            assert written[0][1] == pytest.approx(fused, abs=1e-12)  # the fused score


def test_turns_without_positives_stop_evaluation_and_point_to_the_rewrite_command(fixture_data_dir, tmp_path):
    from cqr_lightning.errors import DataError

    data = tmp_path / "data"
    data.mkdir()
    (data / "corpus.jsonl").write_text((fixture_data_dir / "corpus.jsonl").read_text())
    rows = [json.loads(line) for line in (fixture_data_dir / "dev.jsonl").read_text().splitlines()]
    (data / "dev.jsonl").write_text("".join(json.dumps({**r, "positives": []}) + "\n" for r in rows))
    cfg = evaluate_cfg(data, tmp_path / "o", tmp_path / "m.db", "rewriter=raw", "logger=none")
    with pytest.raises(
        DataError, match=r"none of the 4 turns has a positive passage.*python -m cqr_lightning\.rewrite"
    ):
        run_evaluation(cfg)
    assert not (tmp_path / "o" / "metrics.json").exists()


def test_a_multirun_sweep_writes_each_job_into_its_own_folder(fixture_data_dir, tmp_path):
    sweep = tmp_path / "sweep"
    command = [
        sys.executable, "-m", "cqr_lightning.evaluate", "--multirun", "rewriter=raw,history", "data=jsonl",
        f"data.dir={fixture_data_dir}", f"output_dir={sweep}", "logger=none",
    ]  # fmt: skip
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    for job, rewriter in enumerate(("raw", "history")):
        folder = sweep / str(job)
        assert OmegaConf.load(folder / "config.yaml").rewriter.name == rewriter
        assert OmegaConf.load(folder / "config.yaml").output_dir == str(folder)
        assert json.loads((folder / "metrics.json").read_text())["n"] == 4
        assert (folder / "evaluate.log").is_file()
