"""Hydra entry point: ``shiftlab-train`` / ``python -m shiftlab.trainers.train``.

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

from shiftlab.callbacks.divergence import DivergenceError, DivergenceGuard
from shiftlab.callbacks.probe_budget import ProbeBudget
from shiftlab.callbacks.run_contract import EXIT_CODES, RunContract, RunInterrupted
from shiftlab.callbacks.run_history import EpochHistory
from shiftlab.callbacks import reporting
from shiftlab.trainers.built_checks import check_built
from shiftlab.trainers.build import build_callbacks, build_datamodule, build_loggers, build_module, build_trainer
from shiftlab.trainers.checkpoint_io import RunWriteError, epoch_checkpoint, load_weights_only, test_weights
from shiftlab.trainers.compose import CONFIG_DIR
from shiftlab.trainers.config_checks import ConfigError, check_config
from shiftlab.trainers.console import print_config, quiet_known_noise
from shiftlab.trainers.extensions import ExtensionError, load_extensions
from shiftlab.trainers.run_dir import register_resolvers
from shiftlab.trainers.run_loggers import log_config, log_final, log_plots
from shiftlab.trainers.summary import build_summary, write_outputs, write_summary
from shiftlab.trainers.stacked.launcher import register as _register_stacked_launcher

log = logging.getLogger("shiftlab")
register_resolvers()
_register_stacked_launcher()  # launcher=stacked (Hydra looks launchers up in its plugin registry)


def _fit(trainer: L.Trainer, contract: RunContract, fit: Any) -> tuple[str, str | None, Path | None]:
    """Run ``fit`` and turn every way a run can end into ``(status, reason, checkpoint to resume)``."""
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    try:
        fit()
    except DivergenceError as e:
        return "diverged", str(e), None
    except RunInterrupted as e:
        return e.status, str(e), e.checkpoint
    except RunWriteError as e:
        return "failed", str(e), None
    except (SIGTERMException, KeyboardInterrupt, SystemExit) as e:
        # Lightning's own paths: SIGTERM seen inside validation, or a second Ctrl-C (exit 1).
        status = "preempted" if isinstance(e, SIGTERMException) else (contract.received or "interrupted")
        ckpt = epoch_checkpoint(trainer)
        where = f"resume with ckpt_path={ckpt}" if ckpt else "no checkpoint was written"
        return status, f"{status} at epoch {trainer.current_epoch}, step {trainer.global_step}; {where}", ckpt
    if contract.received:  # the signal came after the last step: the run is complete on disk
        ckpt = epoch_checkpoint(trainer)
        return contract.received, f"{contract.received} after the last epoch; checkpoints are complete", ckpt
    if trainer.interrupted:
        return "interrupted", None, epoch_checkpoint(trainer)
    return "completed", None, None


# With label noise, every run probes up to this many training samples each epoch (clean vs corrupted).
LABEL_NOISE_PROBE_SAMPLES = 4096


def label_noise_probe(cfg: DictConfig, module: L.LightningModule, callbacks: list) -> list[L.Callback]:
    """A memorization probe for a classification run with label noise that has none configured: training
    accuracy on clean and on corrupted samples, against the given and the true labels, every epoch (on a fixed
    subset of at most LABEL_NOISE_PROBE_SAMPLES samples, so its cost stays bounded on large data sets)."""
    from shiftlab.callbacks.memorization import MemorizationMonitor

    noise = float((cfg.get("data") or {}).get("label_noise") or 0.0)
    if noise <= 0 or getattr(module, "task", "") != "classification":
        return []
    if any(isinstance(cb, MemorizationMonitor) for cb in callbacks):
        return []
    return [MemorizationMonitor(every_n_epochs=1, max_samples=LABEL_NOISE_PROBE_SAMPLES)]


def train(cfg: DictConfig, extra_callbacks: list[L.Callback] | None = None) -> dict[str, Any]:
    """Train, test and write one run directory; return the summary dict.

    ``extra_callbacks`` are added to the configured ones (benchmarks, notebooks, sweep drivers).
    The summary's ``status`` is one of completed, diverged, failed, interrupted (SIGINT) or
    preempted (SIGTERM); an interrupted run's summary names the checkpoint to resume from.
    """
    load_extensions(cfg.get("imports") or ())
    check_config(cfg)
    if cfg.get("torch_threads"):
        torch.set_num_threads(int(cfg.torch_threads))
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    out = Path(cfg.paths.output_dir)
    contract = RunContract(out / "checkpoints")
    history_cb = EpochHistory()
    start = time.perf_counter()
    with contract.signals():
        dm = build_datamodule(cfg)
        dm.prepare_data()
        dm.setup("fit")
        module = build_module(cfg, dm)
        guard = DivergenceGuard(**(cfg.get("divergence") or {}))
        callbacks = build_callbacks(cfg) + list(extra_callbacks or [])
        callbacks += label_noise_probe(cfg, module, callbacks)
        callbacks += [ProbeBudget((cfg.get("probes") or {}).get("max_overhead")), history_cb, guard, contract]
        trainer = build_trainer(cfg, callbacks, build_loggers(cfg))
        log_config(trainer.loggers, cfg)
        if cfg.get("print_config") and trainer.is_global_zero:
            print_config(cfg)

        check_built(cfg, dm, module)  # splits, model, probe layers, ckpt_path: before any training
        test_metrics = None
        with warnings.catch_warnings():
            quiet_known_noise()
            status, error, resume = _fit(
                trainer, contract, lambda: trainer.fit(module, datamodule=dm, ckpt_path=cfg.get("ckpt_path")))
            if status != "completed":
                log.error(error or status)
            train_metrics = None
            if status == "completed" and dm.train_set is not None and hasattr(module, "final_train_metrics"):
                train_metrics = module.final_train_metrics(dm.train_set)  # before test loads other weights
            if status == "completed" and cfg.get("test", True):
                test_ckpt, weights = test_weights(trainer, cfg.get("test_ckpt") or "best")
                if test_ckpt is not None:
                    module.load_state_dict(load_weights_only(test_ckpt)["state_dict"])
                status, error, resume = _fit(trainer, contract,
                                             lambda: trainer.test(module, datamodule=dm, verbose=False))
                # Under ddp_spawn the report stays in the workers; the logged scalars come back.
                test_metrics = {k[len("test/"):]: float(v) for k, v in trainer.callback_metrics.items()
                                if k.startswith("test/")}
                test_metrics.update(module.test_report)
        wall = time.perf_counter() - start

        summary = build_summary(trainer, module, dm, history_cb.history, status, error, wall,
                                test_metrics if status == "completed" else None, train_metrics)
        if test_metrics is not None and status == "completed":
            summary["test/weights"] = weights
        if train_metrics:
            summary["train/weights"] = "final: the weights in memory when training ended"
        summary["resumed_from"] = cfg.get("ckpt_path")
        if status in EXIT_CODES:
            summary.update({"epoch": trainer.current_epoch, "step": trainer.global_step,
                            "resume_from": str(resume) if resume else None})
        summary["run_dir"] = str(out)
        if trainer.is_global_zero:
            note = "; ".join(reporting.plot_notes(trainer.callbacks)) or None
            try:
                write_outputs(out, summary, history_cb.history,
                              title=f"{cfg.get('task_name', 'train')}: {out.name}", note=note)
                log_plots(trainer.loggers, out / "plots")
                log_final(trainer.loggers, cfg, summary)
            except RunWriteError as e:
                summary.update(status="failed", stop_reason=str(e))
                log.error("%s", e)
                try:  # the summary is small: it may still fit where a plot did not
                    write_summary(out, summary)
                except RunWriteError:
                    pass
    return summary


def final_line(summary: dict, out: str | Path) -> str:
    """The console's last line: status, the key metrics, where the run directory is."""
    keys = [k for k in ("test/acc", "val/acc", "test/loss", "val/loss") if isinstance(summary.get(k), float)][:2]
    metrics = "".join(f" {k}={summary[k]:.4f}" for k in keys)
    return f"shiftlab: {summary.get('status')}{metrics}; run directory: {out}"


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


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="train")
def _hydra_main(cfg: DictConfig) -> float | None:
    multirun = _is_multirun()
    try:
        summary = train(cfg)
    except (ConfigError, ExtensionError) as e:
        if multirun:
            log.error("job failed: %s", e)
            _write_failure(cfg, f"config error: {e}")
            return math.nan
        print(f"shiftlab: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    except Exception as e:  # a crashed job must not stop the rest of a sweep
        if not multirun:
            raise
        log.exception("job failed")
        _write_failure(cfg, f"{type(e).__name__}: {e}")
        return math.nan
    status = summary.get("status")
    print(final_line(summary, cfg.paths.output_dir), flush=True)
    if status in EXIT_CODES:  # a signal stops the whole sweep, not only this job
        raise SystemExit(EXIT_CODES[status])
    if status != "completed":
        if multirun:
            return math.nan
        raise SystemExit(1)
    return metric_value(summary, cfg.get("optimized_metric"))


def _write_failure(cfg: DictConfig, reason: str) -> None:
    try:
        write_summary(Path(cfg.paths.output_dir), {"status": "failed", "stop_reason": reason})
    except Exception:  # noqa: BLE001 - best effort while already failing
        pass


def main() -> None:
    from shiftlab.trainers.cli_checks import run_cli

    run_cli(_hydra_main, str(CONFIG_DIR))


if __name__ == "__main__":
    main()
