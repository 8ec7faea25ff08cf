"""Keep the reward and dev-metric curves in the run folder (CSV, survives resume) and plot them at the end.

Under DDP the metrics are already reduced over the processes; the main process writes the files."""

from __future__ import annotations

import csv
from pathlib import Path

import lightning as L


class TrainingCurvesCallback(L.Callback):
    def __init__(self, dirpath: str, train_metric: str = "train/reward_mean", val_metric: str = "val/mrr_at_3"):
        self.dirpath = Path(dirpath)
        self.train_metric = train_metric
        self.val_metric = val_metric

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
        if trainer.is_global_zero and self.train_metric in trainer.callback_metrics:
            self._append(trainer.global_step, self.train_metric, float(trainer.callback_metrics[self.train_metric]))

    def on_validation_end(self, trainer: L.Trainer, pl_module) -> None:
        if trainer.is_global_zero and not trainer.sanity_checking and self.val_metric in trainer.callback_metrics:
            self._append(trainer.global_step, self.val_metric, float(trainer.callback_metrics[self.val_metric]))

    def on_fit_end(self, trainer: L.Trainer, pl_module) -> None:
        if not trainer.is_global_zero or not self.csv_path.exists():
            return
        figure_path = plot_curves(self.csv_path, self.dirpath / "curves.png")
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


def plot_curves(csv_path: Path, figure_path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = read_curves(csv_path)
    figure, axes = plt.subplots(1, max(1, len(curves)), figsize=(5 * max(1, len(curves)), 3.5), squeeze=False)
    for axis, (name, points) in zip(axes[0], curves.items(), strict=False):
        axis.plot([s for s, _ in points], [v for _, v in points], marker="." if len(points) < 50 else None)
        axis.set_title(name)
        axis.set_xlabel("step")
        axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(figure_path, dpi=100)
    plt.close(figure)
    return figure_path
