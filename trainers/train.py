"""Hydra entry point: ``shiftlab-train`` / ``python -m trainers.train``.

One call trains one configuration into its run directory and returns the configured
``optimized_metric`` so Hydra sweepers can use it.
"""
from __future__ import annotations

import logging
import math
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from omegaconf import DictConfig

from callbacks.divergence import DivergenceError, DivergenceGuard
from callbacks.run_history import EpochHistory
from trainers.built_checks import check_built
from trainers.build import build_callbacks, build_datamodule, build_loggers, build_module, build_trainer
from trainers.config_checks import ConfigError, check_config
from trainers.console import print_config_tree
from trainers.summary import build_summary, write_outputs

log = logging.getLogger("shiftlab")
CONFIG_DIR = str(Path(__file__).resolve().parent.parent / "configs")


def train(cfg: DictConfig, extra_callbacks: list[L.Callback] | None = None) -> dict[str, Any]:
    """Train, test and write one run directory; return the summary dict.

    ``extra_callbacks`` are added to the configured ones (benchmarks, notebooks, sweep drivers).
    """
    check_config(cfg)
    if cfg.get("torch_threads"):
        torch.set_num_threads(int(cfg.torch_threads))
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    out = Path(cfg.paths.output_dir)
    dm = build_datamodule(cfg)
    dm.prepare_data()
    dm.setup("fit")
    module = build_module(cfg, dm)
    history_cb = EpochHistory()
    callbacks = build_callbacks(cfg) + list(extra_callbacks or []) + [history_cb, DivergenceGuard()]
    trainer = build_trainer(cfg, callbacks, build_loggers(cfg))
    if cfg.get("print_config") and trainer.is_global_zero:
        print_config_tree(cfg)

    check_built(cfg, dm, module)  # splits, model, probe layers, ckpt_path: before any training
    status, error, test_metrics = "completed", None, None
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        warnings.filterwarnings("ignore", message=".*LitLogger.*")
        try:
            trainer.fit(module, datamodule=dm, ckpt_path=cfg.get("ckpt_path"))
        except DivergenceError as e:
            status, error = "diverged", str(e)
            log.error(error)
        if status == "completed" and trainer.interrupted:
            status = "interrupted"
        if status == "completed" and cfg.get("test", True):
            trainer.test(module, datamodule=dm, verbose=False)
            # Under ddp_spawn the report stays in the workers; the logged scalars come back.
            test_metrics = {k[len("test/"):]: float(v) for k, v in trainer.callback_metrics.items()
                            if k.startswith("test/")}
            test_metrics.update(module.test_report)
    wall = time.perf_counter() - start

    summary = build_summary(trainer, module, dm, history_cb.history, status, error, wall, test_metrics)
    summary["resumed_from"] = cfg.get("ckpt_path")
    if trainer.is_global_zero:
        note = next((str(cb.plot_note) for cb in trainer.callbacks if getattr(cb, "plot_note", None)), None)
        write_outputs(out, summary, history_cb.history, title=f"{cfg.get('task_name', 'train')}: {out.name}",
                      note=note)
        log.info("summary: %s", {k: v for k, v in summary.items() if k.startswith(("test/acc", "val/acc"))})
    return summary


def metric_value(summary: dict, name: str | None) -> float | None:
    if not name:
        return None
    value = summary.get(name)
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _is_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def _hydra_main(cfg: DictConfig) -> float | None:
    try:
        summary = train(cfg)
    except ConfigError as e:
        if _is_multirun():
            log.error("job failed: %s", e)
            _write_failure(cfg, f"config error: {e}")
            return math.nan
        print(f"shiftlab: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    except Exception as e:  # a crashed job must not stop the rest of a sweep
        if not _is_multirun():
            raise
        log.exception("job failed")
        _write_failure(cfg, f"{type(e).__name__}: {e}")
        return math.nan
    return metric_value(summary, cfg.get("optimized_metric"))


def _write_failure(cfg: DictConfig, reason: str) -> None:
    import json

    try:
        out = Path(cfg.paths.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "summary.json").write_text(json.dumps({"status": "failed", "stop_reason": reason}, indent=2))
    except Exception:  # noqa: BLE001 - best effort while already failing
        pass


def main() -> None:
    # Compose and check the command line first: Hydra reports composition mistakes itself (several
    # lines, exit 1) before `_hydra_main` runs, and value errors would come after the run directory
    # is made.
    from trainers.cli_checks import preflight

    try:
        preflight(sys.argv[1:], CONFIG_DIR)
    except ConfigError as e:
        print(f"shiftlab: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    _hydra_main()


if __name__ == "__main__":
    main()
