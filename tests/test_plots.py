"""Run plots: integer epochs, log loss axis when it spans decades, markers for few points, both CM views."""
from __future__ import annotations

import matplotlib.pyplot as plt
import pytest

from shiftlab.trainers import plots


@pytest.fixture
def captured(monkeypatch):
    figs = []
    monkeypatch.setattr(plots, "save_png", lambda fig, path: figs.append(fig))
    yield figs
    plt.close("all")


def _history(n, loss0=2.0, decay=0.5):
    return [{"epoch": e, "train/loss": loss0 * decay ** e, "val/loss": loss0 * decay ** e * 1.1,
             "train/acc": 0.5 + 0.04 * e, "val/acc": 0.5 + 0.03 * e} for e in range(n)]


def test_learning_curves_axes(captured, tmp_path):
    plots.plot_learning_curves(_history(3), tmp_path / "a.png", note="x " * 200)
    loss_ax, acc_ax = captured[0].axes
    assert all(float(t).is_integer() for t in loss_ax.get_xticks())
    assert loss_ax.get_yscale() == "linear"  # 2.0 -> 0.5: not decades
    assert loss_ax.lines[0].get_marker() == "o"
    assert loss_ax.get_ylabel() and acc_ax.get_ylabel() and loss_ax.get_legend() is not None
    plots.plot_learning_curves(_history(60, decay=0.85), tmp_path / "b.png")
    loss_ax = captured[1].axes[0]
    assert loss_ax.get_yscale() == "log" and loss_ax.lines[0].get_marker() in (None, "None", "")


def test_label_noise_curves_are_drawn_when_recorded(captured, tmp_path):
    hist = [dict(h, **{"mem/clean_acc": 0.9, "mem/corrupt_acc_given": 0.1, "mem/corrupt_acc_true": 0.5}) for h in _history(4)]
    plots.plot_learning_curves(hist, tmp_path / "c.png")
    labels = [ln.get_label() for ln in captured[0].axes[1].lines]
    assert "train, clean samples" in labels and any("corrupted" in lb for lb in labels)


def test_confusion_matrix_has_counts_normalized_and_colour_bars(captured, tmp_path):
    plots.plot_confusion_matrix([[5, 1], [0, 4]], tmp_path / "cm.png")
    fig = captured[0]
    texts = [t.get_text() for ax in fig.axes[:3] for t in ax.texts]
    assert "5" in texts and "0.83" in texts  # 5/6 on the normalized panel
    assert len(fig.axes) == 4  # two panels, two colour bars


def test_probe_panels_get_markers_labels_and_legends():
    fig, (a, b) = plt.subplots(1, 2)
    a.plot([3], [1.0], label="x")  # one point: invisible as a bare line
    a.plot([3], [2.0], label="y")
    a.set_title("cos(G, G')")
    b.plot(list(range(100)), list(range(100)))
    plots.finish_panels(fig)
    assert a.lines[0].get_marker() == "o" and b.lines[0].get_marker() in (None, "None", "")
    assert a.get_ylabel() == "cos(G, G')" and a.get_legend() is not None
    plt.close(fig)
