"""Stopping callbacks in a real (tiny) Lightning Trainer: callback == replay, best weights are
restored, a resumed run continues the same decision, configs instantiate."""
from __future__ import annotations

import math
import random

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from shiftlab.callbacks.early_stopping import replay
from shiftlab.callbacks.stopping_callbacks import (CurvatureEarlyStopping, GLStopping, PatienceStopping,
                                          PQStopping, UPStopping)


def u_curve(seed: int, n: int = 60) -> tuple[list[float], list[float]]:
    r = random.Random(seed)
    val = [0.3 + 0.4 * ((t - 22) / 22) ** 2 + r.gauss(0, 0.01) for t in range(n)]
    train = [1.0 / (1 + 0.2 * t) for t in range(n)]
    return val, train


class ScriptedModule(L.LightningModule):
    """Logs a prescribed curve; its single weight equals the current epoch, so the restored
    weight tells which epoch was restored."""

    def __init__(self, val: list[float], train: list[float]) -> None:
        super().__init__()
        self.val_curve, self.train_curve = val, train
        self.w = torch.nn.Parameter(torch.zeros(()))

    def training_step(self, batch, batch_idx):
        with torch.no_grad():
            self.w.fill_(float(self.current_epoch))
        self.log("train/loss", self.train_curve[self.current_epoch], on_step=False, on_epoch=True)
        return (self.w * batch[0].sum() * 0.0)

    def validation_step(self, batch, batch_idx):
        self.log("val/loss", self.val_curve[self.current_epoch], on_step=False, on_epoch=True)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def _loader():
    return DataLoader(TensorDataset(torch.ones(2, 1)), batch_size=2)


def _fit(cb, val, train, max_epochs=None, ckpt_dir=None, ckpt_path=None, extra=()):
    callbacks = [cb, *extra]
    if ckpt_dir is not None:
        from lightning.pytorch.callbacks import ModelCheckpoint
        callbacks.append(ModelCheckpoint(dirpath=ckpt_dir, save_last=True, save_top_k=0))
    trainer = L.Trainer(max_epochs=max_epochs or len(val), logger=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        enable_checkpointing=ckpt_dir is not None, num_sanity_val_steps=0,
                        callbacks=callbacks, accelerator="cpu", devices=1)
    module = ScriptedModule(val, train)
    trainer.fit(module, _loader(), _loader(), ckpt_path=ckpt_path)
    return trainer, module


@pytest.mark.parametrize("cb_cls,rule,kw", [
    (CurvatureEarlyStopping, "curvature", {}),
    (PatienceStopping, "patience", {"patience": 5}),
    (GLStopping, "gl", {"alpha": 5.0}),
    (PQStopping, "pq", {"alpha": 0.5}),
    (UPStopping, "up", {"s": 2}),
])
def test_callback_matches_replay_and_restores_best(cb_cls, rule, kw):
    val, train = u_curve(0)
    expected = replay(rule, val, train, **kw)
    assert expected.stopped  # the curve is built so that every rule fires before the horizon
    cb = cb_cls(verbose=False, **kw)
    trainer, module = _fit(cb, val, train)
    assert cb.stopped_epoch == expected.stop_epoch
    assert trainer.current_epoch == expected.stop_epoch + 1  # epochs run
    assert cb.best_trainer_epoch == expected.best_epoch
    assert float(module.w.detach()) == expected.best_epoch  # weights of the best epoch are back
    assert cb.stop_reason and rule in cb.stop_reason
    items = cb.summary_items()["early_stopping"]
    assert items["stopped_epoch"] == expected.stop_epoch and items["restored_epoch"] == expected.best_epoch


def test_curvature_callback_logs_its_forecast():
    val, train = u_curve(1)
    cb = CurvatureEarlyStopping(verbose=False)
    trainer, _ = _fit(cb, val, train)
    logged = trainer.callback_metrics
    for key in ("early_stop/p_continue", "early_stop/forecast_min", "early_stop/forecast_lo",
                "early_stop/forecast_hi", "early_stop/epochs_left", "early_stop/p_improve"):
        assert key in logged and math.isfinite(float(logged[key])), key
    assert float(logged["early_stop/forecast_lo"]) <= float(logged["early_stop/forecast_hi"])
    assert "forecast minimum" in cb.stop_reason
    assert "forecast_min" in cb.summary_items()["early_stopping"]["last_diagnostics"]


class SEModule(ScriptedModule):
    """Also logs ``val/loss_se`` (as the classification module does)."""

    def __init__(self, val, train, se):
        super().__init__(val, train)
        self.se_curve = se

    def validation_step(self, batch, batch_idx):
        super().validation_step(batch, batch_idx)
        self.log("val/loss_se", self.se_curve[self.current_epoch], on_step=False, on_epoch=True)


def test_callback_passes_the_standard_error_to_the_rule():
    val, train = u_curve(3)
    se = [0.002 * (1 + (t % 3)) for t in range(len(val))]
    expected = replay("curvature", val, train, val_se=se)
    cb = CurvatureEarlyStopping(verbose=False)
    trainer = L.Trainer(max_epochs=len(val), logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False,
                        num_sanity_val_steps=0, callbacks=[cb], accelerator="cpu", devices=1)
    trainer.fit(SEModule(val, train, se), _loader(), _loader())
    assert cb.rule.se_values == pytest.approx(se[:len(cb.rule.se_values)])
    assert (cb.stopped_epoch, cb.best_trainer_epoch) == (expected.stop_epoch, expected.best_epoch)


def test_resume_keeps_the_decision_state(tmp_path):
    val, train = u_curve(2)
    expected = replay("curvature", val, train)
    # interrupted one epoch before the stop, after the best epoch: a fresh rule would be in
    # warm-up again and would restore a later epoch's weights
    cut = expected.stop_epoch
    assert expected.best_epoch < cut - 1
    cb1 = CurvatureEarlyStopping(verbose=False)
    _fit(cb1, val, train, max_epochs=cut, ckpt_dir=tmp_path)
    assert cb1.stopped_epoch is None
    cb2 = CurvatureEarlyStopping(verbose=False)
    _, module = _fit(cb2, val, train, ckpt_dir=tmp_path, ckpt_path=str(tmp_path / "last.ckpt"))
    assert cb2.stopped_epoch == expected.stop_epoch
    assert cb2.best_trainer_epoch == expected.best_epoch
    assert float(module.w.detach()) == expected.best_epoch
    assert len(cb2.rule.values) == expected.stop_epoch + 1  # history continued, not restarted


def test_missing_monitor_names_the_available_keys():
    val, train = u_curve(0)
    cb = PatienceStopping(monitor="val/acc", verbose=False)
    with pytest.raises(KeyError, match="val/loss"):
        _fit(cb, val, train, max_epochs=2)


def test_configs_instantiate_every_stopping_callback():
    from hydra.utils import instantiate

    from tests.conftest import compose_cfg

    names = {"curvature_stop": CurvatureEarlyStopping, "patience_stop": PatienceStopping,
             "gl_stop": GLStopping, "pq_stop": PQStopping, "up_stop": UPStopping}
    for group, cls in names.items():
        cfg = compose_cfg([f"callbacks={group}"])
        assert "model_checkpoint" in cfg.callbacks  # the default entries are kept
        cb = instantiate(cfg.callbacks[group])
        assert isinstance(cb, cls)
    cb = instantiate(compose_cfg(["callbacks=curvature_stop", "callbacks.curvature_stop.p_stop=0.3"])
                     .callbacks.curvature_stop)
    assert cb.rule.p_stop == 0.3 and cb.rule.name == "curvature" and cb.se_monitor == "val/loss_se"
    cb = instantiate(compose_cfg(["callbacks=curvature_stop", "callbacks.curvature_stop.rule=quadratic",
                                  "+callbacks.curvature_stop.z=3.5"]).callbacks.curvature_stop)
    assert cb.rule.name == "quadratic" and cb.rule.z == 3.5
