"""Two torchrun processes on 127.0.0.1 acting as the two nodes of the PyTorchJob in deploy/k8s.

The command and arguments come from the rendered CPU overlay; the environment is what the
Kubeflow training operator injects (PET_NNODES, PET_NODE_RANK, PET_NPROC_PER_NODE,
PET_MASTER_ADDR, PET_MASTER_PORT), pointed at loopback. Only the run directory and the run length
are changed for the test.
"""
from __future__ import annotations

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TINY = ["trainer.max_epochs=1", "+trainer.limit_train_batches=3", "+trainer.limit_val_batches=2",
        "+trainer.limit_test_batches=2", "print_config=false", "trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pytorchjob_container() -> dict:
    spec = importlib.util.spec_from_file_location("shiftlab_k8s_render", ROOT / "deploy" / "k8s" / "render.py")
    render = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(render)
    job = next(d for d in render.render(ROOT / "deploy" / "k8s" / "overlays" / "cpu") if d["kind"] == "PyTorchJob")
    return job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0], job


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_two_node_ddp_with_torchrun_on_loopback(tmp_path: Path) -> None:
    container, job = _pytorchjob_container()
    assert container["command"] == ["torchrun"]
    out = tmp_path / "run"
    args = [a for a in container["args"] if not a.startswith("paths.output_dir=")]
    args += [f"paths.output_dir={out}", *TINY]
    nnodes = sum(r["replicas"] for r in job["spec"]["pytorchReplicaSpecs"].values())
    port = _free_port()
    base_env = {k: v for k, v in os.environ.items() if not k.startswith(("PET_", "MASTER_", "RANK", "WORLD_SIZE",
                                                                         "LOCAL_RANK", "TORCHELASTIC"))}
    base_env.update({
        "PET_NNODES": str(nnodes), "PET_NPROC_PER_NODE": job["spec"]["nprocPerNode"],
        "PET_MASTER_ADDR": "127.0.0.1", "PET_MASTER_PORT": str(port),
        "GLOO_SOCKET_IFNAME": "lo", "TP_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1",
        "SHIFTLAB_ROOT": str(tmp_path), "WANDB_MODE": "disabled",
    })
    procs, logs = [], []
    try:
        for rank in range(nnodes):
            env = dict(base_env, PET_NODE_RANK=str(rank))
            log = (tmp_path / f"node{rank}.log").open("w")
            logs.append(log)
            procs.append(subprocess.Popen([sys.executable, "-m", "torch.distributed.run", *args], env=env,
                                          cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT,
                                          start_new_session=True))
        deadline = time.monotonic() + 240
        for p in procs:
            p.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        for log in logs:
            log.close()
    texts = [(tmp_path / f"node{r}.log").read_text() for r in range(nnodes)]
    assert [p.returncode for p in procs] == [0] * nnodes, "\n\n".join(t[-3000:] for t in texts)
    assert "GLOBAL_RANK: 0, MEMBER: 1/2" in texts[0] and "GLOBAL_RANK: 1, MEMBER: 2/2" in texts[1]
    assert "Starting with 2 processes" in texts[0]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["epochs_run"] == 1
