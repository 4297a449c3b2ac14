"""Fixed costs of a stacked group: its members' figures are drawn by forked workers (same files as drawn
here, a failed figure fails only its member) and the launcher reuses the sweeper's compositions."""
from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

from shiftlab.callbacks.learning_curve_diagnosis import diagnose, plot_diagnosis
from shiftlab.trainers.plots import plot_confusion_matrix, plot_learning_curves
from shiftlab.trainers.stacked.launcher import StackedLauncher
from shiftlab.trainers.stacked.outputs import draw_all


def _history(n: int, shift: float) -> list[dict]:
    return [{"epoch": e, "train/loss": 2.0 * 0.6 ** e + shift, "val/loss": 2.1 * 0.7 ** e + shift + 0.01 * e,
             "train/acc": 1 - 0.5 * 0.6 ** e, "val/acc": 0.9 - 0.4 * 0.7 ** e} for e in range(n)]


def _drawings(out: Path, m: int) -> list:
    h = _history(12, 0.01 * m)
    curves = {"epoch": [r["epoch"] for r in h], "train_loss": [r["train/loss"] for r in h],
              "val_loss": [r["val/loss"] for r in h], "train_acc": [r["train/acc"] for r in h]}
    cm = [[9 + m, 1, 0], [2, 7, 1], [0, m, 8]]
    return [(plot_learning_curves, (h, out / "learning_curves.png", f"train: {m}", "a note")),
            (plot_confusion_matrix, (cm, out / "confusion_matrix.png")),
            (plot_diagnosis, (curves, diagnose(curves["train_loss"], curves["val_loss"]), out / "diag.png"))]


def test_forked_workers_write_the_files_drawing_here_writes(tmp_path):
    here = [_drawings(tmp_path / "here" / str(m), m) for m in range(2)]
    forked = [_drawings(tmp_path / "forked" / str(m), m) for m in range(2)]
    assert draw_all(here, workers=1) == [None] * 2
    assert draw_all(forked, workers=2) == [None] * 2
    for m in range(2):
        for name in ("learning_curves.png", "confusion_matrix.png", "diag.png"):
            a, b = tmp_path / "here" / str(m) / name, tmp_path / "forked" / str(m) / name
            assert a.read_bytes() == b.read_bytes(), f"member {m}: {name}"


def test_a_failed_figure_fails_only_its_member(tmp_path):
    blocked = tmp_path / "blocked"
    blocked.write_text("a file where the plots folder should be")
    jobs = [_drawings(tmp_path / "ok0", 0), _drawings(blocked / "plots", 1), _drawings(tmp_path / "ok2", 2)]
    errors = draw_all(jobs, workers=2)
    assert errors[0] is None and errors[2] is None
    assert errors[1] and "\n" not in errors[1]
    assert (tmp_path / "ok2" / "diag.png").is_file()


class _Loader:
    """A config loader that counts compositions."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, ...]] = []

    def load_sweep_config(self, master_config, sweep_overrides):
        self.calls.append(tuple(sweep_overrides))
        return OmegaConf.create({"seed": int(sweep_overrides[0].split("=")[1]), "hydra": {"job": {}}})


class _Context:
    def __init__(self) -> None:
        self.config_loader = _Loader()


def test_launcher_takes_the_configs_the_sweeper_composed():
    ctx, master = _Context(), OmegaConf.create({"hydra": {}})
    launcher = StackedLauncher()
    launcher.setup(hydra_context=ctx, task_function=lambda cfg: None, config=master)
    for s in (0, 1):  # the basic sweeper's validate_batch_is_legal
        ctx.config_loader.load_sweep_config(master_config=master, sweep_overrides=[f"seed={s}"])
    got = [launcher._job_config([f"seed={s}"], s) for s in (0, 1, 2)]
    assert [c.seed for c in got] == [0, 1, 2] and [c.hydra.job.num for c in got] == [0, 1, 2]
    assert ctx.config_loader.calls == [("seed=0",), ("seed=1",), ("seed=2",)]  # seed=2 was not validated
    other = OmegaConf.create({"hydra": {}})  # another sweep config is never remembered
    ctx.config_loader.load_sweep_config(master_config=other, sweep_overrides=["seed=3"])
    launcher._job_config(["seed=3"], 3)
    assert ctx.config_loader.calls[-2:] == [("seed=3",), ("seed=3",)]
