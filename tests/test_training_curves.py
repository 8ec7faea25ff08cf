"""The curves file and plot: smoothing by hand-computed numbers, panels from a written CSV."""

from __future__ import annotations

import pytest

from callbacks.training_curves import plot_curves, read_curves, smoothed


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
