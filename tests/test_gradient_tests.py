"""GradientTests callback and EvidenceRule: real runs, the cost budget, the stopping rule, state."""
from __future__ import annotations

import time
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from torch import nn

from shiftlab.callbacks.stopping_rules import EvidenceRule
from shiftlab.callbacks.gradient_tests import GradientTests


class StepLosses(L.Callback):
    runs: dict[str, list[torch.Tensor]] = {}

    def __init__(self, tag: str) -> None:
        self.tag = tag
        StepLosses.runs[tag] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        StepLosses.runs[self.tag].append(outputs["loss"].detach().clone())


BASE = ["norm=batchnorm", "trainer.max_epochs=2", "+trainer.limit_train_batches=6",
        "+trainer.limit_val_batches=2", "test=false", "trainer.deterministic=true"]


@pytest.mark.timeout(180)
def test_run_logs_tests_and_leaves_training_identical(tmp_path):
    from conftest import QUIET, compose_cfg
    from shiftlab.trainers.train import train

    quiet = [o for o in QUIET if not o.startswith("callbacks=")]
    summaries = {}
    for tag, extra in (("off", ["callbacks=default"]),
                       ("on", ["callbacks=gradient_tests", "callbacks.gradient_tests.every_n_steps=3",
                               "callbacks.gradient_tests.max_overhead=null"])):
        cfg = compose_cfg(quiet + BASE + extra + [
            "+callbacks.recorder._target_=test_gradient_tests.StepLosses",
            f"+callbacks.recorder.tag={tag}"], tmp_path / tag)
        summaries[tag] = train(cfg)
    off, on = StepLosses.runs["off"], StepLosses.runs["on"]
    assert len(off) == len(on) == 12 and all(torch.equal(a, b) for a, b in zip(off, on))
    s = summaries["on"]
    assert s["grad_tests/probes"] == 4 and s["grad_tests/skipped"] == 0  # steps 0, 3, 6, 9
    for q in ("b_simple", "norm_test", "inner_product_test", "orthogonality_test", "gsnr",
              "eb_criterion", "alpha"):
        assert isinstance(s[f"grad_tests/{q}"], float), q
    assert s["grad_tests/seconds"]["per_example_gradients"] > 0 and s["grad_tests/overhead"] > 0
    ckpt = torch.load(tmp_path / "on" / "checkpoints" / "last.ckpt", weights_only=False)
    state = next(v for k, v in ckpt["callbacks"].items() if k.startswith("GradientTests"))
    assert [r["step"] for r in state["history"]] == [0, 3, 6, 9]
    assert all("alpha" in r for r in state["history"])  # each start got its end point


def _fake_trainer():
    return SimpleNamespace(global_step=0, world_size=1, loggers=[], should_stop=False)


def _drive(cb, steps, step_seconds=0.0, noise=False):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    trainer, opt = _fake_trainer(), torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(steps):
        x = torch.randn(32, 6)
        y = torch.randint(0, 3, (32,)) if noise else (x[:, 0] > 0).long()
        trainer.global_step = step
        cb.on_train_batch_start(trainer, model, (x, y), step)
        if trainer.should_stop:
            break
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        time.sleep(step_seconds)
        cb.on_train_batch_end(trainer, model, {"loss": loss}, (x, y), step)
    return trainer


def test_budget_skips_probes_and_is_measured():
    free = GradientTests(every_n_steps=1, max_overhead=None, max_examples=16)
    _drive(free, 12, step_seconds=0.001)
    small = GradientTests(every_n_steps=1, max_overhead=None, max_examples=16, quantities=["b_simple"])
    x, model = torch.randn(32, 6), nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    y = (x[:, 0] > 0).long()
    small.on_train_batch_start(_fake_trainer(), model, (x, y), 0)
    from shiftlab.callbacks import gradient_stats as gs

    first16 = gs.b_simple(gs.gradient_moments(gs.per_example_gradients(model, x[:16], y[:16])[0]))
    assert small.history[-1]["b_simple"] == pytest.approx(first16)
    assert len(free.history) == 12 and free.skipped == 0 and free.overhead > 0
    tight = GradientTests(every_n_steps=1, max_overhead=0.05)
    _drive(tight, 12, step_seconds=0.001)
    assert tight.skipped > 0 and len(tight.history) + tight.skipped == 12
    # what ran fits the budget up to the probe that crossed it
    assert tight.probe_seconds <= 0.05 * tight.train_seconds + max(
        sum(v for k, v in r.items() if k.startswith("cost/")) for r in tight.history) + 0.01
    assert set(tight.costs) >= {"per_example_gradients", "norm_test", "alpha", "eb_criterion"}


def test_state_round_trip_and_bad_values():
    cb = GradientTests(every_n_steps=2, stop_rule="evidence", max_overhead=None)
    _drive(cb, 6)
    clone = GradientTests(every_n_steps=2, stop_rule="evidence")
    clone.load_state_dict(cb.state_dict())
    assert clone.state_dict() == cb.state_dict()
    assert clone.rule.values == cb.rule.values and len(cb.rule.values) == 3
    for kwargs, key in [({"quantities": ["alpha", "tic"]}, "quantities="),
                        ({"max_overhead": 0}, "max_overhead=0"),
                        ({"stop_rule": "patience"}, "stop_rule=patience"),
                        ({"every_n_steps": -1}, "every_n_steps=-1"),
                        ({"max_examples": 1}, "max_examples=1")]:
        with pytest.raises(ValueError, match="allowed") as err:
            GradientTests(**kwargs)
        assert str(err.value).startswith(f"callbacks.gradient_tests.{key}"), err.value


def test_evidence_rule_replay_and_state():
    rule = EvidenceRule(smoothing=0.0, patience=2)
    assert [rule.update(v) for v in (-3.0, 0.5, -1.0, 0.2, 0.1)] == [False] * 4 + [True]
    assert rule.stopped_epoch == 4 and "> 0" in rule.reason
    smooth = EvidenceRule(smoothing=0.5, patience=1)
    stops = [smooth.update(v) for v in (-4.0, 1.0, 1.0, 1.0, 1.0)]
    assert stops.index(True) == 2  # bias-corrected EMA: -4, -2/3, +2/7
    twin = EvidenceRule(smoothing=0.5, patience=1)
    twin.load_state_dict(smooth.state_dict())
    assert twin.ema == smooth.ema and twin.stopped
    with pytest.raises(ValueError, match="allowed"):
        EvidenceRule(smoothing=1.0)


def test_evidence_rule_stops_on_noise_not_on_signal():
    noise = GradientTests(every_n_steps=1, quantities=["eb_criterion"], max_overhead=None,
                          stop_rule="evidence", stop_rule_kwargs={"patience": 3})
    assert _drive(noise, 40, noise=True).should_stop and noise.stop_reason
    signal = GradientTests(every_n_steps=1, quantities=["eb_criterion"], max_overhead=None,
                           stop_rule="evidence", stop_rule_kwargs={"patience": 3})
    assert not _drive(signal, 10).should_stop and signal.stop_reason is None


def test_config_composes_and_bad_value_is_one_line(tmp_path):
    from conftest import QUIET, compose_cfg
    from shiftlab.trainers.build import build_callbacks
    from shiftlab.trainers.config_checks import ConfigError

    quiet = [o for o in QUIET if not o.startswith("callbacks=")]
    cbs = build_callbacks(compose_cfg(quiet + ["callbacks=gradient_tests"], tmp_path / "a"))
    assert any(isinstance(c, GradientTests) and c.every_n_steps == 10 for c in cbs)
    with pytest.raises(ConfigError) as err:
        build_callbacks(compose_cfg(quiet + ["callbacks=gradient_tests",
                                             "callbacks.gradient_tests.quantities=[tic]"], tmp_path / "b"))
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("callbacks.gradient_tests.quantities=") and "allowed" in msg
