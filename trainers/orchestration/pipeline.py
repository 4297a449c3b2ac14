"""Pipeline steps around ``shiftlab-train`` for schedulers (the Airflow DAG in deploy/airflow).

``python -m shiftlab.trainers.orchestration.pipeline prepare --out DIR [overrides...]``
    Compose the train config, download / generate and split the data once (``prepare_data`` +
    ``setup``), write ``DIR/data.json``. Later steps on the same volume reuse the data.
``python -m shiftlab.trainers.orchestration.pipeline evaluate RUN_DIR [--checkpoint best] [--min-test-acc X]``
    Reload a finished run from its ``.hydra/config.yaml`` and checkpoint, score the test and
    validation splits without a Trainer, write ``RUN_DIR/eval.json``; exit 1 below the gate.

Why separate steps: a scheduler retries, caches and reports each step on its own, and the
evaluation must read only what the training step left on disk.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Sequence

from omegaconf import OmegaConf


def prepare(overrides: Sequence[str], out: Path) -> dict[str, Any]:
    from shiftlab.trainers.build import build_datamodule
    from shiftlab.trainers.compose import compose

    cfg = compose(list(overrides), job_name="pipeline")
    dm = build_datamodule(cfg)
    dm.prepare_data()
    dm.setup("fit")
    info = {"overrides": list(overrides), "data": dm.describe() if hasattr(dm, "describe") else {},
            "data_dir": str(cfg.paths.data_dir)}
    out.mkdir(parents=True, exist_ok=True)
    (out / "data.json").write_text(json.dumps(info, indent=2, default=str))
    return info


def evaluate(run_dir: Path, checkpoint: str = "best") -> dict[str, Any]:
    """Score a run's checkpoint. The checkpoint is loaded weights-only (shiftlab's allow-list):
    the step runs on a shared volume, where anyone who can write a ``.ckpt`` must not be able to
    run code in the evaluating pod."""
    import torch

    from shiftlab.trainers.build import build_datamodule, build_module
    from shiftlab.trainers.checkpoint_io import load_checkpoint
    from shiftlab.trainers.summary import evaluate_split

    cfg_path = run_dir / ".hydra" / "config.yaml"
    ckpt = run_dir / "checkpoints" / f"{checkpoint}.ckpt"
    for path in (cfg_path, ckpt):
        if not path.exists():
            raise FileNotFoundError(f"{path} is missing; allowed: a run directory written by shiftlab-train")
    cfg = OmegaConf.load(cfg_path)
    cfg.paths.output_dir = str(run_dir)  # Hydra wrote ${hydra:runtime.output_dir} here
    dm = build_datamodule(cfg)
    dm.prepare_data()
    dm.setup("fit")
    if getattr(dm, "test_set", None) is None:
        dm.setup("test")
    module = build_module(cfg, dm)
    state = load_checkpoint(ckpt, map_location="cpu")
    module.load_state_dict(state["state_dict"])
    device = torch.device("cpu")
    module.to(device)
    result: dict[str, Any] = {"run_dir": str(run_dir), "checkpoint": ckpt.name, "epoch": state.get("epoch")}
    for split in ("val", "test"):
        data = getattr(dm, f"{split}_set", None)
        if data is not None and len(data):
            scores = evaluate_split(module.model, data.x, data.y, device)
            result.update({f"{split}/acc": scores["acc"], f"{split}/loss": scores["loss"]})
    (run_dir / "eval.json").write_text(json.dumps(result, indent=2))
    return result


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m shiftlab.trainers.orchestration.pipeline",
                                     description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="step", required=True)
    p = sub.add_parser("prepare", help="download/generate and split the data")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("overrides", nargs="*")
    e = sub.add_parser("evaluate", help="score a finished run's checkpoint")
    e.add_argument("run_dir", type=Path)
    e.add_argument("--checkpoint", default="best", choices=("best", "last"))
    e.add_argument("--min-test-acc", type=float, default=0.0)
    args = parser.parse_args(argv)
    from shiftlab.trainers.checkpoint_io import CheckpointLoadError
    from shiftlab.trainers.data.cifar10 import CIFAR10IntegrityError

    try:
        if args.step == "prepare":
            info = prepare(args.overrides, args.out)
            print(f"prepared {info['data']}")
            return 0
        result = evaluate(args.run_dir, args.checkpoint)
    except FileNotFoundError as err:
        print(f"pipeline: error: {err}", file=sys.stderr)
        return 2
    except (CheckpointLoadError, CIFAR10IntegrityError) as err:  # refused input: one line, no traceback
        print(f"pipeline: error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(result))
    acc = result.get("test/acc")
    if acc is not None and acc < args.min_test_acc:
        print(f"pipeline: test/acc={acc:.4f} is below --min-test-acc={args.min_test_acc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
