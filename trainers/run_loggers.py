"""What every logger receives besides the step metrics: the resolved config, the run's identity, its plots.

Why: Lightning logs hyperparameters only from ``LightningModule.save_hyperparameters``; shiftlab's modules are
built from a Hydra config, so without this every TensorBoard hparams.yaml was ``{}``, every wandb run config was
empty and every run was called "train". Here the resolved config (without Hydra's own node) goes to each logger
when the run starts, TensorBoard gets it again at the end together with the final metrics (its hparams view
pairs the two), and the PNGs the run wrote are logged as images (wandb images, TensorBoard images).
"""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Iterable, Mapping

from omegaconf import DictConfig, OmegaConf

log = logging.getLogger("shiftlab")

# Summary keys that make the final-metrics side of TensorBoard's hparams table.
FINAL_KEYS = ("val/loss", "val/acc", "test/loss", "test/acc", "train/loss_epoch_mean", "train/acc_epoch_mean",
              "epochs_run", "wall_time_s")


def run_identity(cfg: DictConfig) -> dict[str, Any]:
    """Name (the run directory's name), group (the task / experiment), tags and directory of a run."""
    out = Path(str(cfg.paths.output_dir))
    task = str(cfg.get("task_name") or "train")
    return {"name": out.name, "group": task, "tags": [task], "dir": str(out)}


def config_hparams(cfg: DictConfig) -> dict[str, Any]:
    """The resolved config as plain containers, Hydra's node left out, with the run's identity under ``run``."""
    container = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
    assert isinstance(container, dict)
    container.pop("hydra", None)
    container["run"] = run_identity(cfg)
    return container


def _is(logger: object, name: str) -> bool:
    return type(logger).__name__ == name or any(c.__name__ == name for c in type(logger).__mro__)


def log_config(loggers: Iterable[Any], cfg: DictConfig) -> None:
    """Give every logger the resolved config when the run starts (TensorBoard: stored; written at the end)."""
    params = config_hparams(cfg)
    for lg in loggers:
        if _is(lg, "TensorBoardLogger"):
            lg.hparams.update(params)  # written with the final metrics by log_final
            continue
        lg.log_hyperparams(params)


def _final_metrics(summary: Mapping[str, Any]) -> dict[str, float]:
    out = {}
    for k in FINAL_KEYS:
        v = summary.get(k)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v)):
            out[f"final/{k}"] = float(v)
    return out


def log_final(loggers: Iterable[Any], cfg: DictConfig, summary: Mapping[str, Any]) -> None:
    """TensorBoard's hparams entry: the config together with the final metrics; wandb's summary, then finish."""
    metrics = _final_metrics(summary)
    for lg in loggers:
        try:
            if _is(lg, "TensorBoardLogger"):
                lg.log_hyperparams(config_hparams(cfg), metrics=metrics or {"final/epochs_run": 0.0})
            lg.save()
            if _is(lg, "WandbLogger"):
                lg.experiment.summary.update({"status": summary.get("status"), **metrics})
                # Finish now: the offline record log is complete on disk (ready for `wandb sync`), and the
                # next run in this process (a sweep, a notebook) gets its own wandb run, not this one.
                lg.experiment.finish(exit_code=0 if summary.get("status") == "completed" else 1)
        except Exception as e:  # noqa: BLE001 - a logger's failure must not fail a finished run
            log.warning("could not finish %s: %s", type(lg).__name__, e)


def log_plots(loggers: Iterable[Any], plot_dir: Path, step: int | None = None) -> list[str]:
    """Log each PNG under ``plot_dir`` as an image (wandb and TensorBoard); returns the keys logged."""
    pngs = sorted(Path(plot_dir).glob("*.png"))
    keys = [f"plots/{p.stem}" for p in pngs]
    if not pngs:
        return keys
    for lg in loggers:
        try:
            if _is(lg, "WandbLogger"):
                for key, p in zip(keys, pngs):
                    lg.log_image(key=key, images=[str(p)], step=step)
            elif _is(lg, "TensorBoardLogger"):
                import matplotlib.image as mpimg

                for key, p in zip(keys, pngs):
                    lg.experiment.add_image(key, mpimg.imread(str(p)), global_step=step or 0, dataformats="HWC")
                lg.experiment.flush()
        except Exception as e:  # noqa: BLE001 - a logger's failure must not fail a finished run
            log.warning("could not log plots to %s: %s", type(lg).__name__, e)
    return keys
