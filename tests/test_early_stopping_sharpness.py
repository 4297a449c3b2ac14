"""Sharpness monitor: numbers match an explicit Hessian; as a stopping signal in a Trainer."""
from __future__ import annotations

import lightning as L
import pytest
import torch
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from shiftlab.callbacks.sharpness_monitor import SharpnessMonitor


def test_measure_matches_explicit_hessian():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    x, y = torch.randn(32, 3), torch.randint(0, 2, (32,))
    mon = SharpnessMonitor(power_iters=100, tol=1e-9, trace_samples=300)
    top, trace = mon.measure(model, x, y)

    w0, b0 = model.weight.detach().clone(), model.bias.detach().clone()

    def loss_of(flat):
        return F.cross_entropy(x @ flat[:6].view(2, 3).T + flat[6:], y)

    h = torch.autograd.functional.hessian(loss_of, torch.cat([w0.flatten(), b0]))
    eig = torch.linalg.eigvalsh(h)
    assert top == pytest.approx(float(eig.abs().max()), rel=1e-3)
    assert trace == pytest.approx(float(torch.trace(h)), rel=0.25)
    assert model.training  # mode restored


class TinyClassifier(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self.model(x), y)
        self.log("train/loss", loss, on_step=False, on_epoch=True)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_monitor_logs_every_k_epochs_and_stops_on_bound():
    torch.manual_seed(0)
    x, y = torch.randn(64, 4), torch.randint(0, 3, (64,))
    dl = DataLoader(TensorDataset(x, y), batch_size=32)

    def fit(mon, epochs):
        trainer = L.Trainer(max_epochs=epochs, logger=False, enable_progress_bar=False,
                            enable_model_summary=False, enable_checkpointing=False,
                            callbacks=[mon], accelerator="cpu")
        trainer.fit(TinyClassifier(), dl)
        return trainer

    mon = SharpnessMonitor(every_n_epochs=2, num_samples=32, power_iters=10, trace_samples=2)
    trainer = fit(mon, 6)
    assert mon.history["epoch"] == [1, 3, 5]
    assert all(v > 0 for v in mon.history["top_eigenvalue"])
    assert "sharpness/top_eigenvalue" in trainer.callback_metrics
    assert mon.stop_reason is None and mon.summary_items()["sharpness"]["epochs"] == [1, 3, 5]

    bound = SharpnessMonitor(every_n_epochs=2, num_samples=32, power_iters=10, trace_samples=0,
                             max_top_eigenvalue=1e-6)
    trainer = fit(bound, 6)
    assert trainer.current_epoch == 2 and bound.history["epoch"] == [1]
    assert "max_top_eigenvalue" in bound.stop_reason

    with pytest.raises(ValueError, match="every_n_epochs"):
        SharpnessMonitor(every_n_epochs=0)


def test_sharpness_config_instantiates():
    from hydra.utils import instantiate

    from tests.conftest import compose_cfg

    cfg = compose_cfg(["callbacks=sharpness", "callbacks.sharpness.every_n_epochs=3"])
    mon = instantiate(cfg.callbacks.sharpness)
    assert isinstance(mon, SharpnessMonitor) and mon.every_n_epochs == 3
