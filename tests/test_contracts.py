"""Contract tests, one table over every registry entry and config option.

A new norm, optimizer, stopping rule or config option is covered here without writing a test:
each must build, run forward and backward, round-trip its state, and train under a fast config.
"""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn

from shiftlab.callbacks.stopping_rules import RULES, make_rule
from shiftlab.trainers.norms import create_norm_layer, norm_names
from shiftlab.trainers.optim import OPTIMIZERS

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
SHAPES = {0: (6, 8), 1: (6, 8, 5), 2: (6, 8, 3, 3)}


@pytest.mark.parametrize("dims", [0, 1, 2])
@pytest.mark.parametrize("name", norm_names())
def test_every_norm_at_every_rank(name, dims):
    torch.manual_seed(0)
    layer = create_norm_layer(name, 8, dims)
    x = (torch.randn(*SHAPES[dims]) * 3 + 1).requires_grad_()
    layer.train()
    y = layer(x)
    assert y.shape == x.shape and torch.isfinite(y).all()
    (y.square().sum()).backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    for p in layer.parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), f"{name}: a parameter got no gradient"
    layer.eval()
    with torch.no_grad():
        ref = layer(x)
        twin = create_norm_layer(name, 8, dims)
        twin.load_state_dict(copy.deepcopy(layer.state_dict()))
        twin.eval()
        assert torch.allclose(twin(x), ref, atol=1e-6), f"{name}: state_dict round trip changed the output"
        assert torch.equal(layer(x), ref), f"{name}: eval mode is not deterministic"


def _problem(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x, w = torch.randn(64, 5, generator=g), torch.randn(5, 1, generator=g)
    return x, x @ w + 0.01 * torch.randn(64, 1, generator=g)


def _steps(model: nn.Module, opt, x, y, n: int) -> float:
    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss

    for _ in range(n):
        opt.step(closure)
    with torch.no_grad():
        return float(torch.nn.functional.mse_loss(model(x), y))


LR = {"lbfgs": 1.0, "sgd": 0.1, "momentum": 0.05, "nesterov": 0.05}


@pytest.mark.parametrize("name", OPTIMIZERS.names())
def test_every_optimizer_reduces_a_small_problem_and_resumes_exactly(name):
    x, y = _problem()
    torch.manual_seed(0)
    model = nn.Linear(5, 1)
    opt = OPTIMIZERS.create(name, model.parameters(), lr=LR.get(name, 0.05))
    with torch.no_grad():
        start = float(torch.nn.functional.mse_loss(model(x), y))
    after = _steps(model, opt, x, y, 10)
    assert after < 0.5 * start, f"{name}: loss {start:.4f} -> {after:.4f}"
    twin = copy.deepcopy(model)
    twin_opt = OPTIMIZERS.create(name, twin.parameters(), lr=LR.get(name, 0.05))
    twin_opt.load_state_dict(copy.deepcopy(opt.state_dict()))
    _steps(model, opt, x, y, 3)
    _steps(twin, twin_opt, x, y, 3)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), twin.parameters())), name


def _u_curve(n: int = 40) -> tuple[list[float], list[float]]:
    g = torch.Generator().manual_seed(1)
    t = torch.arange(n, dtype=torch.float64)
    val = 1.0 / (1 + 0.3 * t) + 0.002 * (t - 15).clamp(min=0) ** 1.5 + 0.005 * torch.randn(n, generator=g,
                                                                                          dtype=torch.float64)
    train = 1.0 / (1 + 0.4 * t)
    return val.tolist(), train.tolist()


@pytest.mark.parametrize("name", RULES.names())
def test_every_stopping_rule_replays_and_resumes_exactly(name):
    val, train = _u_curve()
    whole = make_rule(name)
    decisions = [bool(whole.update(v, t)) for v, t in zip(val, train)]
    assert any(decisions), f"{name} never stops on a curve that over-fits for 25 epochs"
    first = make_rule(name)
    half = len(val) // 2
    got = [bool(first.update(v, t)) for v, t in zip(val[:half], train[:half])]
    second = make_rule(name)
    second.load_state_dict(copy.deepcopy(first.state_dict()))
    got += [bool(second.update(v, t)) for v, t in zip(val[half:], train[half:])]
    assert got == decisions, f"{name}: a rule restored from its state decides differently"
    assert second.best_epoch == whole.best_epoch


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIGS / group).glob("*.yaml"))


# model options that need another data set / module than the default digits classifier
CHAIN = ["data=hmm_sequences", "module=sequence", "norm=none", "scheduler=constant"]
NEEDS = {("data", "hmm_sequences"): CHAIN[1:] + ["model=crf"], ("model", "vgg"): ["data.as_images=true", "model.layout=vgg_small"],
         ("model", "resnet"): ["data.as_images=true"]}
CASES = ([("callbacks", o, []) for o in _options("callbacks")]
         + [("logger", o, []) for o in _options("logger")]
         + [("data", o, NEEDS.get(("data", o), [])) for o in _options("data") if o != "cifar10"]  # cifar10:
         # tests/test_spine_data.py trains on a small archive the test writes
         + [("model", o, CHAIN if o in ("hmm", "crf", "position_softmax") else NEEDS.get(("model", o), []))
            for o in _options("model")])


@pytest.mark.parametrize("group,option,extra", CASES, ids=[f"{g}={o}" for g, o, _ in CASES])
def test_every_option_trains_under_a_fast_debug_config(run_cfg, group, option, extra):
    from shiftlab.trainers.train import train

    summary = train(run_cfg(f"{group}={option}", *extra, "debug=fdr"))
    assert summary["status"] == "completed", summary.get("stop_reason")
    assert summary["epochs_run"] == 1
