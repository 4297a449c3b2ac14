"""A 2-trial sweep on a real Ray head on 127.0.0.1, one trial stopped early by Tune's scheduler.

The head is started with ``ray start --head --block`` in its own session, on free loopback ports,
with usage stats off and a temporary directory; it is stopped by signalling its own process group
(never a machine-wide ``ray stop``, which would also stop other users' Ray processes).
"""
from __future__ import annotations

import json
import math
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

if not os.environ.get("CI"):  # in CI the sweep extra is installed: a missing Ray must fail there
    pytest.importorskip("ray.tune", reason="the sweep extra (ray[tune,train]) is not installed")

ROOT = Path(__file__).resolve().parent.parent
RAY_ENV = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled"}


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _session_pids(sid: int) -> list[int]:
    """Live (non-zombie) processes of session ``sid``."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if os.getsid(int(entry.name)) == sid and (entry / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                    pids.append(int(entry.name))
            except (ProcessLookupError, PermissionError, FileNotFoundError, IndexError):
                continue
    return pids


def _stop_session(proc: subprocess.Popen, timeout: float = 3.0) -> None:
    """SIGTERM every process of the head's own session (ray start, GCS, raylet, workers), then
    SIGKILL what is left after ``timeout`` (the GCS, the autoscaler monitor and ``ray start --block``
    itself linger for 20 s and more on SIGTERM); nothing outside that session is touched. The
    cluster's state lives in a temporary directory, so nothing is lost."""
    sid = proc.pid
    for pid in _session_pids(sid):
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + timeout
    while proc.poll() is None or _session_pids(sid):
        if time.monotonic() > deadline:
            break
        time.sleep(0.25)
    # SIGKILL until the session is empty: a raylet may fork a worker while it is being torn down,
    # and a killed process stays visible for a moment before it becomes a zombie.
    deadline = time.monotonic() + 15
    while (left := _session_pids(sid)) and time.monotonic() < deadline:
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.2)
    proc.wait(timeout=10)


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """``host:port`` of a fresh single-node Ray cluster on loopback (2 CPUs, small object store)."""
    tmp = Path(tempfile_dir := tmp_path_factory.mktemp("ray"))
    gcs, dashboard, client, agent = _free_ports(4)
    ray = Path(sys.executable).with_name("ray")
    cmd = [str(ray), "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={gcs}",
           "--num-cpus=2", "--num-gpus=0", "--object-store-memory=100000000", "--include-dashboard=false",
           f"--dashboard-port={dashboard}", f"--ray-client-server-port={client}",
           f"--dashboard-agent-listen-port={agent}", "--disable-usage-stats", f"--temp-dir={tempfile_dir}"]
    log = (tmp / "head.log").open("w")
    env = dict(os.environ, **RAY_ENV)
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while "Ray runtime started" not in (tmp / "head.log").read_text():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("ray head did not start:\n" + (tmp / "head.log").read_text()[-3000:])
            time.sleep(0.5)
        yield f"127.0.0.1:{gcs}"
    finally:
        _stop_session(proc)
        log.close()
    assert _session_pids(proc.pid) == []


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_two_trial_sweep_on_a_ray_head(ray_head: str, tmp_path: Path) -> None:
    out = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "shiftlab.trainers.orchestration.sweep", "hparams_search=digits_mlp", "n_trials=2", "backend=ray",
           f"ray.address={ray_head}", "ray.max_concurrent=1", f"sweep.dir={out}", "trainer.max_epochs=3",
           "print_config=false", "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
           "test=false", "sweep.pruner_args={n_startup_trials:1,n_warmup_steps:0}",
           "sweep.enqueue=[{optimizer.lr:0.01,batching.batch_size:64,optimizer.weight_decay:1.0e-5},"
           "{optimizer.lr:1.0e-6,batching.batch_size:64,optimizer.weight_decay:1.0e-5}]"]
    env = dict(os.environ, **RAY_ENV, SHIFTLAB_ROOT=str(tmp_path), WANDB_MODE="disabled")
    run = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=280)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert f"Connecting to existing Ray cluster at address: {ray_head}" in run.stderr + run.stdout

    sweep = json.loads((out / "sweep.json").read_text())
    assert sweep["backend"] == "ray" and sweep["counts"] == {"complete": 1, "pruned": 1}
    trials = {t["params"]["optimizer.lr"]: t for t in
              (json.loads(p.read_text()) for p in (out / "trials").glob("*/trial.json"))}
    good, bad = trials[0.01], trials[1e-6]
    assert good["state"] == "complete" and good["backend"] == "ray" and good["epochs_reported"] == 3
    assert bad["state"] == "pruned" and bad["reason"].startswith("stopped by MedianStoppingRule after epoch 0")
    assert sweep["best"]["trial_id"] == good["trial_id"]
    for t in (good, bad):
        run_dir = Path(t["run_dir"])
        assert (run_dir / ".hydra" / "config.yaml").exists() and (run_dir / "metrics.csv").exists()
    assert json.loads((Path(good["run_dir"]) / "summary.json").read_text())["status"] == "completed"
    # Tune's OptunaSearch kept the study in the configured SQLite storage
    with sqlite3.connect(out / "study.db") as db:
        assert db.execute("select count(*) from trials").fetchone()[0] == 2
    md = (out / "report" / "report.md").read_text()
    assert f"**Best run: `trials/{good['trial_id']}`**" in md and "stopped by MedianStoppingRule" in md


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_one_run_data_parallel_over_ray_train_workers(ray_head: str, tmp_path: Path) -> None:
    """Ray Train + Lightning's RayDDPStrategy: 2 workers, each sees half of every epoch."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "shiftlab.trainers.orchestration.ray_ddp", f"ray.address={ray_head}", "ray.num_workers=2",
           "trainer.max_epochs=1", "batching.batch_size=64", "print_config=false",
           "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false", f"paths.output_dir={out}"]
    env = dict(os.environ, **RAY_ENV, SHIFTLAB_ROOT=str(tmp_path), WANDB_MODE="disabled")
    run = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=280)
    text = run.stdout + run.stderr
    assert run.returncode == 0, text[-4000:]
    assert "world_size=2" in text
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["epochs_run"] == 1
    per_rank = math.ceil(summary["data"]["train"] / 2)  # DistributedSampler pads to equal shards
    assert summary["global_step"] == math.ceil(per_rank / 64)


def test_ray_ddp_settings_and_config(tmp_path: Path) -> None:
    from shiftlab.trainers.compose import compose
    from shiftlab.trainers.orchestration import ray_ddp
    from shiftlab.trainers.orchestration.ray_settings import RaySettings, RaySettingsError

    overrides, settings = ray_ddp.split_overrides(["ray.num_workers=4", "ray.use_gpu=true", "optimizer.lr=0.1"])
    assert overrides == ["optimizer.lr=0.1"]
    assert settings == RaySettings(num_workers=4, use_gpu=True)  # the rest at their defaults
    with pytest.raises(RaySettingsError, match=r"^ray.workers=2 is not allowed; allowed: ray.address, ray.num_workers, "
                                              r"ray.use_gpu, ray.cpus_per_worker$"):
        ray_ddp.split_overrides(["ray.workers=2"])
    with pytest.raises(RaySettingsError, match="ray.num_workers=0 is not allowed; allowed: an integer >= 1"):
        ray_ddp.split_overrides(["ray.num_workers=0"])
    with pytest.raises(RaySettingsError, match="ray.use_gpu='yes please' is not allowed; allowed: true or false"):
        ray_ddp.split_overrides(["ray.use_gpu=yes please"])
    # a sweep's key is not the launcher's (and the other way round: tests/test_sweep.py)
    with pytest.raises(RaySettingsError, match="ray.max_concurrent=2 is not allowed"):
        ray_ddp.split_overrides(["ray.max_concurrent=2"])
    run = ray_ddp.ray_config(compose(["trainer=ddp"]), use_gpu=False, run_dir=tmp_path)
    assert run.trainer.strategy == {"_target_": "ray.train.lightning.RayDDPStrategy"}
    assert run.trainer.plugins == [{"_target_": "ray.train.lightning.RayLightningEnvironment"}]
    assert run.paths.output_dir == str(tmp_path) and run.cluster_env == "none" and run.trainer.accelerator == "cpu"
    assert ray_ddp.main(["ray.bogus=1"]) == 2


def test_sweep_and_ddp_read_ray_settings_through_one_parser() -> None:
    """Both entry points get a RaySettings from ray_settings.parse_ray_settings, with the same
    defaults and checks for the keys they share."""
    from shiftlab.trainers.orchestration import ray_ddp
    from shiftlab.trainers.orchestration.ray_settings import RaySettings
    from shiftlab.trainers.orchestration.settings import SweepSettings
    from shiftlab.trainers.orchestration.trial import compose_config

    sweep = SweepSettings.from_cfg(compose_config(["hparams_search=digits_mlp", "sweep.ray.address=auto",
                                                   "sweep.ray.cpus_per_trial=2"]))
    _, ddp = ray_ddp.split_overrides(["ray.address=auto", "ray.cpus_per_worker=2"])
    assert isinstance(sweep.ray, RaySettings) and isinstance(ddp, RaySettings)
    assert sweep.ray.address == ddp.address == "auto"
    assert (sweep.ray.max_concurrent, sweep.ray.cpus_per_trial, sweep.ray.gpus_per_trial) == (2, 2.0, 0.0)
    assert (ddp.num_workers, ddp.use_gpu, ddp.cpus_per_worker) == (2, False, 2.0)
