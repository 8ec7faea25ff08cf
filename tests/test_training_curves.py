"""The curves file and plot: smoothing by hand-computed numbers, panels from a written CSV, and the raw-question
baseline recorded by a GRPO run of the tiny model."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
from omegaconf import OmegaConf

from callbacks.mlflow_steps import MLflowStepsCallback
from callbacks.training_curves import TrainingCurvesCallback, curves_figure, plot_curves, read_curves, smoothed
from cqr_lightning.evaluation import score_turns, summarize
from cqr_lightning.mlflow_logger import StepAlignedMLFlowLogger
from cqr_lightning.models.loading import load_policy, load_tokenizer
from cqr_lightning.modules.rl import RLModule
from cqr_lightning.readers import read_jsonl_turns
from cqr_lightning.retrieval.factory import open_retriever
from cqr_lightning.scoring import RetrievalScorer
from cqr_lightning.search import SearchPlan
from data_modules.conversations import ConversationDataModule

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


def test_smoothed_is_a_trailing_mean_over_the_window():
    assert smoothed([1.0, 3.0, 5.0, 7.0], window=2) == [1.0, 2.0, 4.0, 6.0]
    assert smoothed([2.0, 4.0, 6.0], window=5) == [2.0, 3.0, 4.0]
    assert smoothed([], window=3) == []


def test_plot_has_a_panel_per_metric_and_a_resumed_step_wins(tmp_path):
    csv_path = tmp_path / "curves.csv"
    rows = ["step,metric,value", "0,val/mrr_at_3,0.2"]
    rows += [f"{step},train/reward_mean,{step / 20:.3f}" for step in range(1, 21)]
    rows += ["3,train/kl,0.01", "3,train/kl,0.02", "20,val/mrr_at_3,0.4"]  # step 3 redone after a resume
    csv_path.write_text("\n".join(rows) + "\n")
    curves = read_curves(csv_path)
    assert curves["train/kl"] == [(3, 0.02)] and curves["val/mrr_at_3"] == [(0, 0.2), (20, 0.4)]
    figure = plot_curves(csv_path, tmp_path / "curves.png", smooth="train/reward_mean")
    assert figure.stat().st_size > 0
    import matplotlib.image

    height, width = matplotlib.image.imread(figure).shape[:2]
    assert width == pytest.approx(3 * height * 5 / 3.5, rel=0.01)  # three panels of 5 x 3.5 inches


def test_raw_question_baseline_is_a_line_in_the_dev_metric_panel_not_a_panel(tmp_path):
    import matplotlib.pyplot as plt

    curves = {
        "train/reward_mean": [(1, 0.5), (2, 0.7)],
        "val/raw_mrr_at_3": [(0, 0.25)],
        "val/mrr_at_3": [(2, 0.4), (4, 0.5)],
    }
    figure = curves_figure(curves, smooth="train/reward_mean")
    titles = [axis.get_title() for axis in figure.axes]
    assert titles == ["train/reward_mean", "val/mrr_at_3"]
    val_axis = figure.axes[1]
    flat = [line for line in val_axis.get_lines() if len(set(line.get_ydata())) == 1 and len(line.get_ydata()) == 2]
    assert [list(line.get_ydata()) for line in flat] == [[0.25, 0.25]]  # axhline: one y across the panel
    assert [text.get_text() for text in val_axis.get_legend().get_texts()] == ["raw question (0.250)"]
    assert not [line for line in figure.axes[0].get_lines() if line.get_label().startswith("raw question")]
    plt.close(figure)
    only_baseline = curves_figure({"val/raw_mrr_at_3": [(0, 0.25)]})  # before the first validation point
    assert [axis.get_title() for axis in only_baseline.axes] == ["val/mrr_at_3"]
    plt.close(only_baseline)


class CountingScorer(RetrievalScorer):
    """Counts the batches of turns it scores."""

    calls = 0

    def evaluate(self, turns, rewrites):
        self.calls += 1
        return super().evaluate(turns, rewrites)


def test_grpo_run_records_the_raw_question_baseline_once(tiny_model_cfg, data_cfg, bm25s_cfg, tmp_path):
    tokenizer = load_tokenizer(tiny_model_cfg)
    plan = SearchPlan.from_config(OmegaConf.load(CONF_DIR / "search" / "default.yaml"))
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    logger = StepAlignedMLFlowLogger(experiment_name="curves", tracking_uri=tracking)
    stage_dir = tmp_path / "rl"
    with open_retriever(bm25s_cfg, data_cfg.corpus, show_progress=False) as retriever:
        dev = list(read_jsonl_turns(Path(data_cfg.dir) / "dev.jsonl"))
        expected = summarize(score_turns(dev, [None] * len(dev), retriever, plan))["mrr@3"]
        for steps in (2, 1):  # the second fit on the same folder stands for a resumed run: nothing recorded again
            scorer = CountingScorer(retriever, plan, response_format="rewrite_only")
            module = RLModule(load_policy(tiny_model_cfg), tokenizer, group_size=2, max_new_tokens=6,
                              max_prompt_length=256, response_format="rewrite_only", scorer=scorer)  # fmt: skip
            trainer = L.Trainer(
                accelerator="cpu",
                max_steps=steps,
                logger=logger,
                callbacks=[TrainingCurvesCallback(str(stage_dir)), MLflowStepsCallback()],
                val_check_interval=1,
                check_val_every_n_epoch=None,
                num_sanity_val_steps=0,
                enable_checkpointing=False,
                enable_progress_bar=False,
                enable_model_summary=False,
            )
            trainer.fit(module, datamodule=ConversationDataModule(data_cfg, batch_size=1, eval_batch_size=2))
            assert module.raw_question_metrics["val/mrr_at_3"] == pytest.approx(expected)
            assert scorer.calls == 2 * steps + 2  # each validation: two batches of two turns; the first, the raw too
    rows = (stage_dir / "curves.csv").read_text().splitlines()
    assert [row for row in rows if "val/raw_" in row] == [f"0,val/raw_mrr_at_3,{expected:.6f}"]
    assert [step for step, _ in read_curves(stage_dir / "curves.csv")["val/mrr_at_3"]] == [1, 2]
    history = logger.experiment.get_metric_history(logger.run_id, "val/raw_mrr_at_3")
    assert [(m.step, m.value) for m in history] == [(0, pytest.approx(expected))]
    assert (stage_dir / "curves.png").is_file()
