"""Stopping callbacks in a real (tiny) Lightning Trainer: callback == replay, best weights are
restored, a resumed run continues the same decision, configs instantiate."""
from __future__ import annotations

import math
import random

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from shiftlab.callbacks.early_stopping import RuleEarlyStopping
from shiftlab.callbacks.stopping_rules import replay


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


@pytest.mark.parametrize("rule,kw", [
    ("curvature", {}),
    ("patience", {"patience": 5}),
    ("gl", {"alpha": 5.0}),
    ("pq", {"alpha": 0.5}),
    ("up", {"s": 2}),
])
def test_callback_matches_replay_and_restores_best(rule, kw):
    val, train = u_curve(0)
    expected = replay(rule, val, train, **kw)
    assert expected.stopped  # the curve is built so that every rule fires before the horizon
    cb = RuleEarlyStopping(rule, verbose=False, **kw)
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
    cb = RuleEarlyStopping(verbose=False)
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
    cb = RuleEarlyStopping(verbose=False)
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
    cb1 = RuleEarlyStopping(verbose=False)
    _fit(cb1, val, train, max_epochs=cut, ckpt_dir=tmp_path)
    assert cb1.stopped_epoch is None
    cb2 = RuleEarlyStopping(verbose=False)
    _, module = _fit(cb2, val, train, ckpt_dir=tmp_path, ckpt_path=str(tmp_path / "last.ckpt"))
    assert cb2.stopped_epoch == expected.stop_epoch
    assert cb2.best_trainer_epoch == expected.best_epoch
    assert float(module.w.detach()) == expected.best_epoch
    assert len(cb2.rule.values) == expected.stop_epoch + 1  # history continued, not restarted


def test_missing_monitor_names_the_available_keys():
    val, train = u_curve(0)
    cb = RuleEarlyStopping("patience", monitor="val/acc", verbose=False)
    with pytest.raises(KeyError, match="val/loss"):
        _fit(cb, val, train, max_epochs=2)


def test_configs_instantiate_every_stopping_callback():
    from hydra.utils import instantiate

    from tests.conftest import compose_cfg

    names = {"curvature_stop": "curvature", "patience_stop": "patience", "gl_stop": "gl",
             "pq_stop": "pq", "up_stop": "up"}
    for group, rule in names.items():
        cfg = compose_cfg([f"callbacks={group}"])
        assert "model_checkpoint" in cfg.callbacks  # the default entries are kept
        cb = instantiate(cfg.callbacks[group])
        assert type(cb) is RuleEarlyStopping and cb.rule.name == rule  # one class, configured
    cb = instantiate(compose_cfg(["callbacks=curvature_stop", "callbacks.curvature_stop.p_stop=0.3"])
                     .callbacks.curvature_stop)
    assert cb.rule.p_stop == 0.3 and cb.rule.name == "curvature" and cb.se_monitor == "val/loss_se"
    cb = instantiate(compose_cfg(["callbacks=curvature_stop", "callbacks.curvature_stop.rule=quadratic",
                                  "+callbacks.curvature_stop.z=3.5"]).callbacks.curvature_stop)
    assert cb.rule.name == "quadratic" and cb.rule.z == 3.5


# The state keys the five former per-rule classes (CurvatureEarlyStopping, PatienceStopping,
# GLStopping, PQStopping, UPStopping in callbacks/stopping_callbacks.py) wrote: Lightning's
# ``_generate_state_key(rule=..., monitor=..., mode=...)`` of each, spelled out here.
OLD_KEYS = {
    "curvature": "CurvatureEarlyStopping{'rule': 'curvature', 'monitor': 'val/loss', 'mode': 'min'}",
    "patience": "PatienceStopping{'rule': 'patience', 'monitor': 'val/loss', 'mode': 'min'}",
    "gl": "GLStopping{'rule': 'gl', 'monitor': 'val/loss', 'mode': 'min'}",
    "pq": "PQStopping{'rule': 'pq', 'monitor': 'val/loss', 'mode': 'min'}",
    "up": "UPStopping{'rule': 'up', 'monitor': 'val/loss', 'mode': 'min'}",
}


@pytest.mark.parametrize("rule", sorted(OLD_KEYS))
def test_state_key_is_the_one_the_former_class_wrote(rule):
    assert RuleEarlyStopping(rule, verbose=False).state_key == OLD_KEYS[rule]


def _old_format_checkpoint(tmp_path, key: str, cut: int, val, train) -> str:
    """A checkpoint whose callback state sits under ``key`` (as a former class saved it)."""
    cb = RuleEarlyStopping(verbose=False)
    _fit(cb, val, train, max_epochs=cut, ckpt_dir=tmp_path)
    ckpt = torch.load(tmp_path / "last.ckpt", weights_only=False)
    states = ckpt["callbacks"]
    states[key] = states.pop(cb.state_key)
    torch.save(ckpt, tmp_path / "old.ckpt")
    return str(tmp_path / "old.ckpt")


@pytest.mark.parametrize("old_class", ["CurvatureEarlyStopping", "RuleEarlyStopping"])
def test_checkpoint_written_under_an_old_key_resumes_with_its_callback_state(tmp_path, old_class):
    val, train = u_curve(2)
    expected = replay("curvature", val, train)
    cut = expected.stop_epoch
    key = f"{old_class}{{'rule': 'curvature', 'monitor': 'val/loss', 'mode': 'min'}}"
    path = _old_format_checkpoint(tmp_path, key, cut, val, train)
    assert key in torch.load(path, weights_only=False)["callbacks"]
    cb = RuleEarlyStopping(verbose=False)
    _, module = _fit(cb, val, train, ckpt_dir=tmp_path / "resumed", ckpt_path=path)
    assert len(cb.rule.values) == expected.stop_epoch + 1  # history continued, not restarted
    assert (cb.stopped_epoch, cb.best_trainer_epoch) == (expected.stop_epoch, expected.best_epoch)
    assert float(module.w.detach()) == expected.best_epoch  # best weights from before the resume


def test_a_rule_argument_the_rule_does_not_take_is_one_line_naming_the_allowed():
    with pytest.raises(ValueError, match=r"^patience=3 is not allowed for rule=gl; allowed: alpha, warmup$"):
        RuleEarlyStopping("gl", patience=3)
    with pytest.raises(ValueError, match=r"^rule=plateau is not allowed; allowed: .*curvature.*patience"):
        RuleEarlyStopping("plateau")
    assert RuleEarlyStopping("patience", patience=None).rule.patience == 10  # None: rule default


def test_a_rule_registered_from_a_user_module_runs_in_the_callback(tmp_path, monkeypatch):
    """The add-a-rule path: a user's file, listed under ``imports:``, registers a rule that the
    one callback then runs by name (no edit of shiftlab)."""
    from shiftlab.callbacks.stopping_rules import RULES
    from shiftlab.trainers.extensions import load_extensions

    (tmp_path / "my_es_rules.py").write_text(
        "from shiftlab.callbacks.stopping_rules import StoppingRule, register_rule\n\n"
        "@register_rule('after_n_test')\n"
        "class AfterN(StoppingRule):\n"
        "    def __init__(self, n: int = 3, mode: str = 'min', warmup: int = 0):\n"
        "        self.n = n\n"
        "        super().__init__(mode=mode, warmup=warmup)\n"
        "    def _decide(self):\n"
        "        return f'{self.n} epochs' if self.epoch + 1 >= self.n else None\n")
    monkeypatch.chdir(tmp_path)
    try:
        load_extensions([str(tmp_path / "my_es_rules.py")])
        val, train = u_curve(0)
        cb = RuleEarlyStopping("after_n_test", n=4, verbose=False)
        trainer, _ = _fit(cb, val, train)
        assert cb.stopped_epoch == 3 and trainer.current_epoch == 4
        with pytest.raises(ValueError, match="^m=1 is not allowed for rule=after_n_test; allowed: n, warmup"):
            RuleEarlyStopping("after_n_test", m=1)
    finally:
        RULES._entries.pop("after_n_test", None)
