"""Keep the training and dev-metric curves in the run folder (CSV, survives resume) and plot them.

Training metrics (the reward or loss, and the KL and copy rate where the stage logs them) are recorded after every
step, the dev metric after every validation, both at `trainer.global_step`. Validation metrics also go to the log
(train.log). The plot is drawn at the end of `fit` and again after a validation outside it (the warm-up's final
one), with a smoothed line over the first training curve. The raw question's value of the dev metric, which the
module computes at its first validation on the same turns and search plan (`raw_question_metrics`), is recorded
once as `val/raw_<metric>` at step 0 (CSV, log, MLflow) and drawn as a horizontal line in the dev metric's panel,
so the plot shows whether training beats the question. Under DDP the metrics are already reduced over the
processes, and only the main process writes the files.
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Sequence
from pathlib import Path

import lightning as L
from lightning.pytorch.trainer.states import TrainerFn

log = logging.getLogger(__name__)
DEFAULT_TRAIN_METRICS = ("train/reward_mean", "train/kl", "train/copy_rate")
BASELINE_PREFIX = "val/raw_"  # val/raw_mrr_at_3: the raw question's val/mrr_at_3


def baseline_name(metric: str) -> str:
    """The curves-file name of the raw question's value of a validation metric."""
    return BASELINE_PREFIX + metric.removeprefix("val/")


class TrainingCurvesCallback(L.Callback):
    def __init__(
        self,
        dirpath: str,
        train_metrics: str | Sequence[str] = DEFAULT_TRAIN_METRICS,
        val_metric: str = "val/mrr_at_3",
    ):
        self.dirpath = Path(dirpath)
        self.train_metrics = (train_metrics,) if isinstance(train_metrics, str) else tuple(train_metrics)
        self.val_metric = val_metric
        self._baseline_recorded = False

    @property
    def csv_path(self) -> Path:
        return self.dirpath / "curves.csv"

    def _append(self, step: int, name: str, value: float) -> None:
        self.dirpath.mkdir(parents=True, exist_ok=True)
        new = not self.csv_path.exists()
        with self.csv_path.open("a", newline="") as handle:
            writer = csv.writer(handle)
            if new:
                writer.writerow(["step", "metric", "value"])
            writer.writerow([step, name, f"{value:.6f}"])

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if not trainer.is_global_zero:
            return
        for name in self.train_metrics:
            if name in trainer.callback_metrics:
                self._append(trainer.global_step, name, float(trainer.callback_metrics[name]))

    def on_validation_end(self, trainer: L.Trainer, pl_module) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        shown = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
        if shown:
            log.info("step %d validation: %s", trainer.global_step, ", ".join(f"{k}={v:.4f}" for k, v in shown.items()))
        if self.val_metric in shown:
            self._append(trainer.global_step, self.val_metric, shown[self.val_metric])
        self.record_baseline(trainer, getattr(pl_module, "raw_question_metrics", None) or {})
        if trainer.state.fn == TrainerFn.VALIDATING and trainer.global_step > 0:
            self.plot_and_log(trainer)  # a validation after training: its point belongs in the plot

    def record_baseline(self, trainer: L.Trainer, raw_metrics: dict[str, float]) -> None:
        """The raw question's value of the dev metric, at step 0, once per run folder (a resumed run has it)."""
        if self.val_metric not in raw_metrics or self._baseline_recorded:
            return
        name = baseline_name(self.val_metric)
        self._baseline_recorded = self.csv_path.exists() and name in read_curves(self.csv_path)
        if self._baseline_recorded:
            return
        value = raw_metrics[self.val_metric]
        log.info("raw question validation: %s=%.4f", self.val_metric, value)
        for logger in trainer.loggers:
            if hasattr(logger, "run_id") and hasattr(logger.experiment, "log_metric"):
                logger.experiment.log_metric(logger.run_id, name, value, step=0)
        self._append(0, name, value)
        self._baseline_recorded = True

    def on_fit_end(self, trainer: L.Trainer, pl_module) -> None:
        if trainer.is_global_zero:
            self.plot_and_log(trainer)

    def plot_and_log(self, trainer: L.Trainer) -> None:
        if not self.csv_path.exists():
            return
        figure_path = plot_curves(self.csv_path, self.dirpath / "curves.png", smooth=self.train_metrics[0])
        for logger in trainer.loggers:
            if hasattr(logger, "run_id") and hasattr(logger.experiment, "log_artifact"):
                logger.experiment.log_artifact(logger.run_id, str(self.csv_path))
                logger.experiment.log_artifact(logger.run_id, str(figure_path))


def read_curves(csv_path: Path) -> dict[str, list[tuple[int, float]]]:
    curves: dict[str, dict[int, float]] = {}
    with Path(csv_path).open() as handle:
        for row in csv.DictReader(handle):
            curves.setdefault(row["metric"], {})[int(row["step"])] = float(row["value"])  # a resumed step wins
    return {name: sorted(points.items()) for name, points in curves.items()}


def smoothed(values: Sequence[float], window: int) -> list[float]:
    """Trailing moving average: point i is the mean of the `window` values ending at i (fewer at the start)."""
    out, total = [], 0.0
    for i, value in enumerate(values):
        total += value
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def plot_curves(csv_path: Path, figure_path: Path, smooth: str | None = None) -> Path:
    import matplotlib.pyplot as plt

    figure = curves_figure(read_curves(csv_path), smooth)
    figure.savefig(figure_path, dpi=100)
    plt.close(figure)
    return figure_path


def curves_figure(curves: dict[str, list[tuple[int, float]]], smooth: str | None = None):
    """One panel per metric, `smooth` first and with a smoothed line once it has 10 points; a raw-question
    baseline (`val/raw_<metric>`) is a dashed horizontal line in its metric's panel, not a panel of its own."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    baselines = {}  # metric -> the raw question's value
    for name, points in curves.items():
        if name.startswith(BASELINE_PREFIX) and points:
            baselines["val/" + name.removeprefix(BASELINE_PREFIX)] = points[-1][1]
    curves = {name: points for name, points in curves.items() if not name.startswith(BASELINE_PREFIX)}
    curves.update({name: [] for name in baselines if name not in curves})
    curves = dict(sorted(curves.items(), key=lambda item: item[0] != smooth))  # the smoothed curve first
    figure, axes = plt.subplots(1, max(1, len(curves)), figsize=(5 * max(1, len(curves)), 3.5), squeeze=False)
    for axis, (name, points) in zip(axes[0], curves.items(), strict=False):
        steps, values = [s for s, _ in points], [v for _, v in points]
        axis.plot(steps, values, marker="." if len(points) < 50 else None, alpha=0.4 if len(points) >= 10 else 1.0)
        if name == smooth and len(points) >= 10:
            window = max(2, len(points) // 10)
            axis.plot(steps, smoothed(values, window), label=f"mean of {window} steps")
        if name in baselines:
            label = f"raw question ({baselines[name]:.3f})"
            axis.axhline(baselines[name], color="grey", linestyle="--", label=label)
        if axis.get_legend_handles_labels()[0]:
            axis.legend()
        axis.set_title(name)
        axis.set_xlabel("step")
        axis.grid(alpha=0.3)
    figure.tight_layout()
    return figure
