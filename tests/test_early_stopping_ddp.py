"""DDP agreement: two CPU processes (gloo) see *different* validation values (logged without
``sync_dist``); the callback must still stop every rank after the same epoch, the one rank 0's
curve dictates, and restore the same weights.

Run as a script this file is the training job (Lightning's ``ddp`` launcher re-runs it for rank
1); the test runs it in a subprocess so pytest's own process never joins a process group.
"""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve()


def curves(rank: int, n: int = 50) -> tuple[list[float], list[float]]:
    r = random.Random(7)
    val = [0.3 + 0.4 * ((t - 18) / 18) ** 2 + r.gauss(0, 0.01) for t in range(n)]
    if rank == 1:  # rank 1 alone sees a curve that keeps falling: its own rule would not stop
        val = [1.0 / (1 + 0.1 * t) for t in range(n)]
    return val, [1.0 / (1 + 0.2 * t) for t in range(n)]


def _job(out: Path) -> None:
    import lightning as L
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    from shiftlab.callbacks.early_stopping import RuleEarlyStopping

    class Scripted(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(()))

        def training_step(self, batch, batch_idx):
            with torch.no_grad():
                self.w.fill_(float(self.current_epoch))
            train = curves(self.global_rank)[1]
            self.log("train/loss", train[self.current_epoch], on_step=False, on_epoch=True)
            return self.w * batch[0].sum() * 0.0

        def validation_step(self, batch, batch_idx):
            val = curves(self.global_rank)[0]
            self.log("val/loss", val[self.current_epoch], on_step=False, on_epoch=True)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.0)

    torch.set_num_threads(1)
    cb = RuleEarlyStopping(verbose=False)
    trainer = L.Trainer(max_epochs=50, accelerator="cpu", devices=2, strategy="ddp",
                        logger=False, enable_progress_bar=False, enable_model_summary=False,
                        enable_checkpointing=False, num_sanity_val_steps=0, callbacks=[cb],
                        use_distributed_sampler=False)
    dl = DataLoader(TensorDataset(torch.ones(2, 1)), batch_size=2)
    module = Scripted()
    trainer.fit(module, dl, dl)
    (out / f"rank{trainer.global_rank}.json").write_text(json.dumps({
        "stopped_epoch": cb.stopped_epoch, "best_epoch": cb.best_trainer_epoch,
        "epochs_run": trainer.current_epoch, "w": float(module.w.detach())}))


@pytest.mark.slow
def test_every_rank_takes_rank_zero_decision(tmp_path):
    from shiftlab.callbacks.stopping_rules import replay

    # the caller's path first: a checkout imported through PYTHONPATH stays the one tested
    path = os.pathsep.join(p for p in (os.environ.get("PYTHONPATH"), str(HERE.parent.parent)) if p)
    env = dict(os.environ, PYTHONPATH=path, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(HERE), str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0 = json.loads((tmp_path / "rank0.json").read_text())
    r1 = json.loads((tmp_path / "rank1.json").read_text())
    val, train = curves(0)
    expected = replay("curvature", val, train)
    assert expected.stopped and not replay("curvature", *curves(1)).stopped
    assert r0 == r1
    assert r0["stopped_epoch"] == expected.stop_epoch and r0["best_epoch"] == expected.best_epoch
    assert r0["w"] == expected.best_epoch


if __name__ == "__main__":
    _job(Path(sys.argv[1]))
