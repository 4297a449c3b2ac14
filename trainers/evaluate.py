"""``shiftlab-eval``: evaluate an existing checkpoint into a new run directory.

Why: a run's test figures come from one checkpoint on one data draw; re-evaluating that checkpoint on another
label-noise seed, another split fraction or with other loggers should not need a training run. The run's own
overrides (``<run>/.hydra/overrides.yaml``) are applied before the command line's, so the model built matches
the checkpoint; a checkpoint of another model is refused in one line (exit 2).
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import yaml
from omegaconf import DictConfig

from shiftlab.trainers.build import build_datamodule, build_loggers, build_module, build_trainer
from shiftlab.trainers.built_checks import check_ckpt_path
from shiftlab.trainers.compose import CONFIG_DIR
from shiftlab.trainers.config_checks import ConfigError, check_config
from shiftlab.trainers.extensions import ExtensionError, load_extensions
from shiftlab.trainers.run_dir import register_resolvers
from shiftlab.trainers.run_loggers import log_config, log_final, log_plots
from shiftlab.trainers.summary import write_outputs

log = logging.getLogger("shiftlab")
register_resolvers()


def load_into(module: L.LightningModule, ckpt_path: str | Path) -> dict[str, Any]:
    """Load a checkpoint's weights into ``module``; a checkpoint of another model is a ConfigError (the check
    ``shiftlab-train ckpt_path=...`` runs)."""
    ckpt = check_ckpt_path(str(ckpt_path), module)
    module.load_state_dict(ckpt["state_dict"])
    return ckpt


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Test ``cfg.ckpt_path`` on the configured data; write and return the summary."""
    load_extensions(cfg.get("imports") or ())
    check_config(cfg)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    out = Path(cfg.paths.output_dir)
    dm = build_datamodule(cfg)
    dm.prepare_data()
    dm.setup("test")
    module = build_module(cfg, dm)
    ckpt = load_into(module, cfg.ckpt_path)
    trainer = build_trainer(cfg, [], build_loggers(cfg))
    log_config(trainer.loggers, cfg)
    trainer.test(module, datamodule=dm, verbose=False)
    report = dict(module.test_report)
    summary: dict[str, Any] = {"status": "completed", "stop_reason": "evaluation", "run_dir": str(out),
                               "test/weights": f"checkpoint: {cfg.ckpt_path} (epoch {ckpt.get('epoch')})"}
    summary.update({k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("test/")})
    summary.update({f"test/{k}": v for k, v in report.items() if k != "confusion_matrix"})
    summary["test/confusion_matrix"] = report.get("confusion_matrix")
    if hasattr(dm, "describe") and getattr(dm, "train_set", None) is not None:
        summary["data"] = dm.describe()
    if trainer.is_global_zero:
        write_outputs(out, summary, [], title=f"eval: {out.name}")
        _write_per_class(out, report)
        log_plots(trainer.loggers, out / "plots")
        log_final(trainer.loggers, cfg, summary)
    return summary


def _write_per_class(out: Path, report: dict[str, Any]) -> None:
    """per_class.csv: precision, recall and support of each class (support from the confusion matrix)."""
    import pandas as pd

    from shiftlab.trainers.checkpoint_io import atomic_write_text

    cm = report.get("confusion_matrix")
    if not cm or "precision_per_class" not in report:
        return
    table = pd.DataFrame({"precision": report["precision_per_class"], "recall": report["recall_per_class"],
                          "support": [int(sum(row)) for row in cm]})
    table.index.name = "class"
    atomic_write_text(out / "per_class.csv", table.to_csv())


def _run_overrides(argv: list[str]) -> list[str]:
    """The checkpoint's run's own overrides that the command line does not set itself, placed first."""
    ckpt = next((a.split("=", 1)[1] for a in argv if a.startswith("ckpt_path=")), None)
    if not ckpt:
        return []
    saved = Path(ckpt).resolve().parent.parent / ".hydra" / "overrides.yaml"
    if not saved.is_file():
        return []
    mine = {a.lstrip("+~").split("=", 1)[0] for a in argv if "=" in a}
    drop = {"ckpt_path", "paths.output_dir", "hydra.run.dir", "task_name", "test_ckpt"}
    return [o for o in (yaml.safe_load(saved.read_text()) or [])
            if o.lstrip("+~").split("=", 1)[0] not in mine | drop and not o.startswith("hydra")]


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="eval")
def _hydra_main(cfg: DictConfig) -> None:
    from shiftlab.trainers.train import final_line

    try:
        summary = evaluate(cfg)
    except (ConfigError, ExtensionError) as e:
        print(f"shiftlab: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    print(final_line(summary, cfg.paths.output_dir), flush=True)


def main() -> None:
    from shiftlab.trainers.cli_checks import run_cli

    argv = sys.argv[1:]
    if not any(a.startswith("ckpt_path=") for a in argv) and not any(a.startswith("-") for a in argv):
        print("shiftlab: error: ckpt_path is required; allowed: ckpt_path=<run>/checkpoints/best.ckpt",
              file=sys.stderr)
        raise SystemExit(2)
    sys.argv[1:] = _run_overrides(argv) + argv
    run_cli(_hydra_main, str(CONFIG_DIR), config_name="eval")


if __name__ == "__main__":
    main()
