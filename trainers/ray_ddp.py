"""``python -m shiftlab.trainers.ray_ddp``: one run, data-parallel over the workers of a Ray cluster.

The multi-node alternative to torchrun / a PyTorchJob when a Ray cluster is what you have: Ray
Train's ``TorchTrainer`` starts ``ray.num_workers`` processes (one per GPU with
``ray.use_gpu=true``) wherever the cluster has room, sets up the process group, and each worker
runs the unchanged :func:`shiftlab.trainers.train.train` with Lightning's Ray path swapped in through the
config: ``trainer.strategy`` = ``ray.train.lightning.RayDDPStrategy``, ``trainer.plugins`` =
``[RayLightningEnvironment]`` (Ray supplies ranks and world size). The run directory must be on
storage every worker sees (rank 0 writes ``summary.json``, checkpoints and plots).

    python -m shiftlab.trainers.ray_ddp experiment=<name> ray.address=auto ray.num_workers=4 ray.use_gpu=true
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from omegaconf import DictConfig, OmegaConf, open_dict

RAY_KEYS = {"address": None, "num_workers": 2, "use_gpu": False, "cpus_per_worker": 1}


def split_overrides(args: Sequence[str]) -> tuple[list[str], dict[str, Any]]:
    """Hydra overrides for the run, and the ``ray.*`` settings of this launcher."""
    import yaml

    overrides, ray_cfg = [], dict(RAY_KEYS)
    for arg in args:
        if arg.startswith("ray."):
            key, _, value = arg[4:].partition("=")
            if key not in RAY_KEYS:
                raise ValueError(f"ray.{key} is unknown; allowed: {', '.join('ray.' + k for k in RAY_KEYS)}")
            ray_cfg[key] = yaml.safe_load(value)
        else:
            overrides.append(arg)
    n = ray_cfg["num_workers"]
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"ray.num_workers={n!r} is not allowed; allowed: an integer >= 1")
    return overrides, ray_cfg


def ray_config(cfg: DictConfig, use_gpu: bool, run_dir: Path) -> DictConfig:
    """``cfg`` with Lightning's Ray strategy and environment and a fixed run directory."""
    with open_dict(cfg):
        cfg.paths.output_dir = str(run_dir)
        cfg.cluster_env = "none"
        cfg.trainer.strategy = {"_target_": "ray.train.lightning.RayDDPStrategy"}
        cfg.trainer.plugins = [{"_target_": "ray.train.lightning.RayLightningEnvironment"}]
        cfg.trainer.accelerator = "gpu" if use_gpu else "cpu"
        cfg.trainer.devices = "auto"
        cfg.trainer.num_nodes = 1
    return cfg


def _worker(config: dict) -> None:
    """Runs on every Ray Train worker."""
    from shiftlab.trainers.train import train

    train(OmegaConf.create(config["cfg"]))


def run(overrides: Sequence[str], ray_cfg: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from shiftlab.trainers.sweep import compose_config

    cfg = ray_config(compose_config(list(overrides)), bool(ray_cfg["use_gpu"]), run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / ".hydra").mkdir(exist_ok=True)
    (run_dir / ".hydra" / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    started_here = not ray.is_initialized()
    if started_here:
        ray.init(address=ray_cfg["address"], include_dashboard=False if ray_cfg["address"] is None else None)
    try:
        trainer = TorchTrainer(
            _worker,
            train_loop_config={"cfg": OmegaConf.to_container(cfg, resolve=False)},
            scaling_config=ScalingConfig(num_workers=int(ray_cfg["num_workers"]), use_gpu=bool(ray_cfg["use_gpu"]),
                                         resources_per_worker={"CPU": float(ray_cfg["cpus_per_worker"])}),
            run_config=RunConfig(name=run_dir.name, storage_path=str(run_dir / "ray")),
        )
        start = time.perf_counter()
        trainer.fit()
        wall = time.perf_counter() - start
    finally:
        if started_here:
            ray.shutdown()
    summary = json.loads((run_dir / "summary.json").read_text())
    summary["ray_wall_time_s"] = round(wall, 3)
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        overrides, ray_cfg = split_overrides(args)
    except ValueError as e:
        print(f"ray_ddp: error: {e}", file=sys.stderr)
        return 2
    run_dir = next((Path(a.split("=", 1)[1]) for a in overrides if a.startswith("paths.output_dir=")), None)
    overrides = [a for a in overrides if not a.startswith("paths.output_dir=")]
    if run_dir is None:
        run_dir = Path("outputs") / "ray_ddp" / time.strftime("%Y-%m-%d_%H-%M-%S")
    summary = run(overrides, ray_cfg, run_dir.resolve())
    print(f"{summary.get('status')}: {run_dir} val/acc={summary.get('val/acc')} in {summary['ray_wall_time_s']} s "
          f"on {ray_cfg['num_workers']} Ray workers")
    return 0 if summary.get("status") == "completed" else 1


if __name__ == "__main__":
    raise SystemExit(main())
