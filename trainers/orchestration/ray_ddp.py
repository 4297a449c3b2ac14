"""One run, data-parallel over the workers of a Ray cluster (``python -m shiftlab.trainers.orchestration.ray_ddp``).

The multi-node alternative to torchrun / a PyTorchJob when a Ray cluster is what you have: Ray
Train's ``TorchTrainer`` starts ``ray.num_workers`` processes (one per GPU with
``ray.use_gpu=true``) wherever the cluster has room, sets up the process group, and each worker
runs the unchanged :func:`shiftlab.trainers.train.train` with Lightning's Ray path swapped in through the
config: ``trainer.strategy`` = ``ray.train.lightning.RayDDPStrategy``, ``trainer.plugins`` =
``[RayLightningEnvironment]`` (Ray supplies ranks and world size). The run directory must be on
storage every worker sees (rank 0 writes ``summary.json``, checkpoints and plots).

    python -m shiftlab.trainers.orchestration.ray_ddp experiment=<name> ray.address=auto \\
        ray.num_workers=4 ray.use_gpu=true
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from omegaconf import DictConfig, OmegaConf, open_dict

from shiftlab.trainers.orchestration.ray_settings import (DDP_KEYS, RaySettings, RaySettingsError, ray_session,
                                                          split_ray_args)


def split_overrides(args: Sequence[str]) -> tuple[list[str], RaySettings]:
    """Hydra overrides for the run, and the ``ray.*`` settings of this launcher (checked by
    :mod:`.ray_settings`, the same code that checks a sweep's ``sweep.ray``)."""
    return split_ray_args(args, DDP_KEYS)


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


def run(overrides: Sequence[str], settings: RaySettings, run_dir: Path) -> dict[str, Any]:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from shiftlab.trainers.compose import compose

    cfg = ray_config(compose(list(overrides), job_name="ray_ddp"), settings.use_gpu, run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / ".hydra").mkdir(exist_ok=True)
    (run_dir / ".hydra" / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    with ray_session(settings):
        trainer = TorchTrainer(
            _worker,
            train_loop_config={"cfg": OmegaConf.to_container(cfg, resolve=False)},
            scaling_config=ScalingConfig(num_workers=settings.num_workers, use_gpu=settings.use_gpu,
                                         resources_per_worker={"CPU": settings.cpus_per_worker}),
            run_config=RunConfig(name=run_dir.name, storage_path=str(run_dir / "ray")),
        )
        start = time.perf_counter()
        trainer.fit()
        wall = time.perf_counter() - start
    summary = json.loads((run_dir / "summary.json").read_text())
    summary["ray_wall_time_s"] = round(wall, 3)
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        overrides, settings = split_overrides(args)
    except RaySettingsError as e:
        print(f"ray_ddp: error: {e}", file=sys.stderr)
        return 2
    run_dir = next((Path(a.split("=", 1)[1]) for a in overrides if a.startswith("paths.output_dir=")), None)
    overrides = [a for a in overrides if not a.startswith("paths.output_dir=")]
    if run_dir is None:
        run_dir = Path("outputs") / "ray_ddp" / time.strftime("%Y-%m-%d_%H-%M-%S")
    summary = run(overrides, settings, run_dir.resolve())
    print(f"{summary.get('status')}: {run_dir} val/acc={summary.get('val/acc')} in {summary['ray_wall_time_s']} s "
          f"on {settings.num_workers} Ray workers")
    return 0 if summary.get("status") == "completed" else 1


if __name__ == "__main__":
    raise SystemExit(main())
