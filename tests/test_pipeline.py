"""shiftlab.trainers.orchestration.pipeline evaluate: checkpoints load weights-only (finding 8)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from omegaconf import OmegaConf

from shiftlab.trainers.orchestration import pipeline


class _RunsCommand:
    """Unpickling this would call os.system(command)."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def _run_dir(run_cfg, tmp_path: Path, extra: dict | None = None) -> Path:
    from shiftlab.trainers.build import build_datamodule, build_module

    cfg = run_cfg("data=digits", "model=mlp")
    run_dir = Path(cfg.paths.output_dir)
    dm = build_datamodule(cfg)
    dm.prepare_data()
    dm.setup("fit")
    module = build_module(cfg, dm)
    (run_dir / ".hydra").mkdir(parents=True)
    OmegaConf.save(cfg, run_dir / ".hydra" / "config.yaml")
    (run_dir / "checkpoints").mkdir()
    torch.save({"state_dict": module.state_dict(), "epoch": 3, **(extra or {})}, run_dir / "checkpoints" / "best.ckpt")
    return run_dir


def test_evaluate_scores_a_checkpoint_loaded_weights_only(run_cfg, tmp_path: Path, capsys) -> None:
    run_dir = _run_dir(run_cfg, tmp_path)
    assert pipeline.main(["evaluate", str(run_dir)]) == 0
    result = json.loads((run_dir / "eval.json").read_text())
    assert result["epoch"] == 3 and 0.0 <= result["val/acc"] <= 1.0 and "test/acc" in result


def test_evaluate_refuses_a_checkpoint_that_would_run_code(run_cfg, tmp_path: Path, capsys) -> None:
    marker = tmp_path / "pwned"
    run_dir = _run_dir(run_cfg, tmp_path, extra={"hyper_parameters": _RunsCommand(f"touch {marker}")})
    assert pipeline.main(["evaluate", str(run_dir)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("pipeline: error: best.ckpt cannot be read: it holds ") and "allow-list" in err
    assert "\n" not in err and not marker.exists() and not (run_dir / "eval.json").exists()
