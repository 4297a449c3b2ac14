"""The sharpness callback: numbers match an explicit Hessian; subset and seed options; as a stopping
signal in a Trainer; resume from its own and from the replaced classes' checkpoint states."""
from __future__ import annotations

import lightning as L
import pytest
import torch
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from types import SimpleNamespace

from shiftlab.callbacks.sharpness import SharpnessMonitor, sharpness_on_subset


def test_measure_matches_explicit_hessian():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    x, y = torch.randn(32, 3), torch.randint(0, 2, (32,))
    out = sharpness_on_subset(model, x, y, power_iters=100, tol=1e-9, trace_samples=300,
                              generator=torch.Generator().manual_seed(0), method="power")
    top, trace = out["top_eigenvalue"], out["trace"]

    w0, b0 = model.weight.detach().clone(), model.bias.detach().clone()

    def loss_of(flat):
        return F.cross_entropy(x @ flat[:6].view(2, 3).T + flat[6:], y)

    h = torch.autograd.functional.hessian(loss_of, torch.cat([w0.flatten(), b0]))
    eig = torch.linalg.eigvalsh(h)
    assert top == pytest.approx(float(eig.abs().max()), rel=1e-3)
    assert trace == pytest.approx(float(torch.trace(h)), rel=0.25)
    assert model.training  # mode restored


def test_lanczos_in_train_mode_matches_the_dense_hessian_and_leaves_running_stats():
    """The callback's default path: Lanczos with its evidence, BatchNorm with batch statistics on a copy."""
    import copy

    from helpers_hessian import dense_hessian

    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Tanh(),
                                torch.nn.Linear(4, 2))
    x, y = torch.randn(24, 3), torch.randint(0, 2, (24,))
    before = model[1].running_mean.clone()
    out = sharpness_on_subset(model, x, y, method="lanczos", model_mode="train", tol=1e-6, trace_samples=0,
                              generator=torch.Generator().manual_seed(0))
    assert torch.equal(model[1].running_mean, before) and model.training
    twin = copy.deepcopy(model).train()  # the callback's train mode: batch statistics, on a copy
    eig = torch.linalg.eigvalsh(dense_hessian(twin, x, y))
    assert out["top_eigenvalue"] == pytest.approx(float(eig.max()), rel=1e-4)
    assert out["top_eigenvalue_converged"] == 1.0 and out["top_eigenvalue_residual"] < 1e-3
    assert out["top_eigenvalue_hvps"] > 0


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

    mon = SharpnessMonitor(every_n_epochs=2, subset_size=32, power_iters=10, trace_samples=2)
    trainer = fit(mon, 5)  # epochs 1, 3 by the period, 4 because it is the last
    assert [h["epoch"] for h in mon.history] == [1, 3, 4]
    assert all(h["top_eigenvalue"] > 0 for h in mon.history)
    assert "sharpness/top_eigenvalue" in trainer.callback_metrics
    assert "probe_cost/sharpness_s" in trainer.callback_metrics
    items = mon.summary_items()
    assert mon.stop_reason is None and items["sharpness/top_eigenvalue"] == mon.history[-1]["top_eigenvalue"]
    assert all(not isinstance(v, (dict, list)) for v in items.values())  # one flat schema
    assert items["probe_cost/sharpness_s"] > 0 and "probe_cost/sharpness_skipped" not in items  # no budget set

    bound = SharpnessMonitor(every_n_epochs=2, subset_size=32, power_iters=10, trace_samples=0,
                             max_top_eigenvalue=1e-6)
    trainer = fit(bound, 6)
    assert trainer.current_epoch == 2 and [h["epoch"] for h in bound.history] == [1]
    assert "max_top_eigenvalue" in bound.stop_reason and "sharpness/trace" not in bound.summary_items()

    with pytest.raises(ValueError, match="every_n_epochs"):
        SharpnessMonitor(every_n_epochs=0)


def test_sharpness_config_instantiates():
    from hydra.utils import instantiate

    from tests.conftest import compose_cfg

    cfg = compose_cfg(["callbacks=sharpness", "callbacks.sharpness.every_n_epochs=3"])
    mon = instantiate(cfg.callbacks.sharpness)
    assert isinstance(mon, SharpnessMonitor) and mon.every_n_epochs == 3
    assert (mon.subset, mon.seed_policy, mon.max_overhead) == ("first", "fixed", None)
    bn = instantiate(compose_cfg(["callbacks=batch_noise"]).callbacks.sharpness)
    assert (bn.subset, bn.seed_policy, bn.max_overhead, bn.every_n_epochs) == ("random", "per_epoch", 0.1, 10)


class _Recorder(torch.nn.Module):
    """A linear model that remembers which samples each forward saw (by their first feature)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(2, 3)
        self.seen: list[torch.Tensor] = []

    def forward(self, x):
        self.seen.append(x[:, 0].detach().clone())
        return self.lin(x)


def _fake(n=40, epoch=0, max_epochs=10):
    x = torch.stack([torch.arange(n, dtype=torch.float32), torch.randn(n, generator=torch.Generator().manual_seed(1))], 1)
    split = SimpleNamespace(x=x, y=torch.arange(n) % 3, y_true=torch.arange(n) % 3)
    trainer = SimpleNamespace(datamodule=SimpleNamespace(train_set=split), current_epoch=epoch, global_step=0,
                              max_epochs=max_epochs, should_stop=False, world_size=1, strategy=None)
    module = SimpleNamespace(model=_Recorder(), logged={})
    module.log = lambda key, value, **_: module.logged.__setitem__(key, value)
    return trainer, module


@pytest.mark.parametrize("subset", ["first", "random"])
def test_subset_option_picks_the_samples_it_names(subset):
    trainer, module = _fake()
    mon = SharpnessMonitor(every_n_epochs=1, subset=subset, subset_size=8, power_iters=2, trace_samples=1, seed=3)
    mon.on_train_epoch_end(trainer, module)
    trainer.current_epoch = 1
    mon.on_train_epoch_end(trainer, module)
    ids = {tuple(int(v) for v in s) for s in module.model.seen}
    assert len(ids) == 1  # the same samples in every forward of both probes
    (got,) = ids
    if subset == "first":
        assert got == tuple(range(8))
    else:
        assert len(got) == 8 and got != tuple(range(8)) and max(got) < 40
        other = SharpnessMonitor(every_n_epochs=1, subset="random", subset_size=8, power_iters=2, trace_samples=1,
                                 seed=4)
        t2, m2 = _fake()
        other.on_train_epoch_end(t2, m2)
        assert tuple(int(v) for v in m2.model.seen[0]) != got  # the draw follows the seed


@pytest.mark.parametrize("policy", ["fixed", "per_epoch"])
def test_seed_policy_fixes_or_varies_the_probe_vectors(policy):
    """Same weights at two epochs: a fixed seed gives the same estimate, a per-epoch seed another draw."""
    trainer, module = _fake()
    mon = SharpnessMonitor(every_n_epochs=1, subset_size=40, power_iters=1, trace_samples=3, seed_policy=policy)
    for epoch in (0, 1):
        trainer.current_epoch = epoch
        mon.on_train_epoch_end(trainer, module)
    a, b = mon.history
    assert mon.probe_seed(1) == (0 if policy == "fixed" else 1)
    if policy == "fixed":
        assert (a["top_eigenvalue"], a["trace"]) == (b["top_eigenvalue"], b["trace"])
    else:
        assert (a["top_eigenvalue"], a["trace"]) != (b["top_eigenvalue"], b["trace"])


def test_budget_skips_probes_but_not_the_last_epoch():
    trainer, module = _fake(max_epochs=5)
    mon = SharpnessMonitor(every_n_epochs=1, subset_size=16, power_iters=2, trace_samples=1, max_overhead=0.1,
                           epsilon_sharpness=True, eps_steps=2)
    mon.on_train_start(trainer, module)
    mon.on_train_epoch_end(trainer, module)  # the first probe always runs: it measures the cost
    assert {"sharpness/top_eigenvalue", "sharpness/trace", "sharpness/eps_sharpness"} <= set(module.logged)
    mon.seconds = 1e6  # pretend probing has cost far more than training
    trainer.current_epoch = 1
    mon.on_train_epoch_end(trainer, module)
    assert mon.skipped == 1 and len(mon.history) == 1
    trainer.current_epoch = 4  # the last epoch is probed whatever the budget
    mon.on_train_epoch_end(trainer, module)
    assert len(mon.history) == 2 and mon.summary_items()["probe_cost/sharpness_skipped"] == 1


def test_state_round_trip_and_checkpoints_of_the_replaced_classes():
    trainer, module = _fake()
    mon = SharpnessMonitor(every_n_epochs=1, subset_size=8, power_iters=3, trace_samples=1, stop_rule="patience",
                           stop_rule_kwargs={"patience": 5})
    mon.on_train_epoch_end(trainer, module)
    fresh = SharpnessMonitor(every_n_epochs=1, subset_size=8, power_iters=3, trace_samples=1,
                             stop_rule="patience", stop_rule_kwargs={"patience": 5})
    fresh.load_state_dict(mon.state_dict())
    assert fresh.history == mon.history and fresh.seconds == mon.seconds
    assert fresh.rule.state_dict() == mon.rule.state_dict()
    # old SharpnessMonitor state (history as columns) under its own key
    old = SharpnessMonitor()
    old.load_state_dict({"history": {"epoch": [4, 9], "top_eigenvalue": [1.0, 2.0], "trace": [3.0, 4.0]},
                         "rule": None, "stop_reason": None})
    assert old.summary_items()["sharpness/top_eigenvalue"] == 2.0 and old.history[0]["epoch"] == 4
    # old SharpnessProbe state, found under that class's key in the checkpoint
    probe_state = {"history": [{"epoch": 9.0, "top_eigenvalue": 5.0, "trace": 6.0}], "seconds": 2.5, "skipped": 1}
    legacy = SharpnessMonitor()
    legacy.on_load_checkpoint(None, None, {"callbacks": {"SharpnessProbe": probe_state}})
    assert legacy.summary_items()["sharpness/trace"] == 6.0 and legacy.skipped == 1 and legacy.seconds == 2.5


def test_bad_options_are_refused():
    for kwargs, word in (({"subset": "last"}, "subset"), ({"seed_policy": "per_step"}, "seed_policy"),
                         ({"labels": "noisy"}, "labels"), ({"max_overhead": 0}, "max_overhead"),
                         ({"power_iters": 0, "max_top_eigenvalue": 1.0}, "power_iters")):
        with pytest.raises(ValueError, match=word):
            SharpnessMonitor(**kwargs)


def test_resumed_fit_continues_the_same_series(tmp_path):
    """Stop after 2 epochs, save, resume to 4: the same probes and values as one 4-epoch fit."""
    x, y = torch.randn(64, 4, generator=torch.Generator().manual_seed(0)), torch.arange(64) % 3
    dl = DataLoader(TensorDataset(x, y), batch_size=32)

    def fit(epochs, ckpt=None):
        torch.manual_seed(0)
        mon = SharpnessMonitor(every_n_epochs=1, subset_size=32, power_iters=5, trace_samples=2,
                               stop_rule="patience", stop_rule_kwargs={"patience": 10})
        trainer = L.Trainer(max_epochs=epochs, logger=False, enable_progress_bar=False, enable_model_summary=False,
                            enable_checkpointing=False, callbacks=[mon], accelerator="cpu")
        trainer.fit(TinyClassifier(), dl, ckpt_path=ckpt)
        return trainer, mon

    whole = fit(4)[1]
    trainer, _ = fit(2)
    trainer.save_checkpoint(tmp_path / "two.ckpt")
    resumed = fit(4, tmp_path / "two.ckpt")[1]
    assert [h["epoch"] for h in resumed.history] == [0, 1, 2, 3]
    assert [h["top_eigenvalue"] for h in resumed.history] == [h["top_eigenvalue"] for h in whole.history]
    assert repr(resumed.rule.state_dict()) == repr(whole.rule.state_dict())  # repr: NaN entries compare equal


def _relu_mlp(act=torch.nn.ReLU, bn: bool = False) -> torch.nn.Module:
    torch.manual_seed(2)
    layers = [torch.nn.Linear(4, 6)] + ([torch.nn.BatchNorm1d(6)] if bn else []) + [act(), torch.nn.Linear(6, 3)]
    return torch.nn.Sequential(*layers).double()


def test_trace_method_auto_is_exact_for_relu_nets_and_hutchinson_elsewhere():
    from helpers_hessian import dense_hessian

    x, y = torch.randn(30, 4, dtype=torch.double), torch.randint(0, 3, (30,))
    relu = _relu_mlp()
    out = sharpness_on_subset(relu, x, y, power_iters=0, trace_samples=100, trace_target_rel_error=0.05,
                              trace_method="auto")
    assert out["trace_method"] == "ggn" and out["trace_exact"] == 1.0 and "trace_se" not in out
    assert out["trace"] == pytest.approx(float(torch.trace(dense_hessian(relu.eval(), x, y))), rel=1e-5)
    bn = _relu_mlp(bn=True)  # train mode: batch statistics couple the examples -> Hutchinson
    out = sharpness_on_subset(bn, x, y, power_iters=0, trace_samples=30, trace_target_rel_error=0.05,
                              trace_method="auto", model_mode="train", generator=torch.Generator().manual_seed(0))
    assert out["trace_method"] == "hutchinson" and out["trace_se"] > 0
    with pytest.raises(ValueError, match="batch statistics"):
        sharpness_on_subset(bn, x, y, power_iters=0, trace_method="ggn", model_mode="train")
    out = sharpness_on_subset(bn, x, y, power_iters=0, trace_method="auto", model_mode="eval")
    assert out["trace_method"] == "ggn" and out["trace_exact"] == 1.0  # eval-mode BN is affine
    tanh = _relu_mlp(torch.nn.Tanh)
    out = sharpness_on_subset(tanh, x, y, power_iters=0, trace_samples=30, trace_method="auto",
                              generator=torch.Generator().manual_seed(0))
    assert out["trace_method"] == "hutchinson"
    out = sharpness_on_subset(tanh, x, y, power_iters=0, trace_method="ggn")
    assert out["trace_method"] == "ggn" and out["trace_exact"] == 0.0  # the GGN's trace, flagged
    with pytest.raises(ValueError, match="trace_method"):
        SharpnessMonitor(trace_method="exact")
