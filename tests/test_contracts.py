"""Contract tests, one table over every registry entry and config option.

A new norm, optimizer, stopping rule or config option is covered here without writing a test:
each must build, run forward and backward, round-trip its state, and train under a fast config.
"""
from __future__ import annotations

import copy
import functools
import warnings
from pathlib import Path

import pytest
import torch
import yaml
from hydra.utils import get_method, instantiate
from omegaconf import OmegaConf
from torch import nn

from shiftlab.callbacks.stopping_rules import RULES, make_rule
from shiftlab.trainers.norms import create_norm_layer, norm_names, norm_registry
from shiftlab.trainers.optim import OPTIMIZERS, SCHEDULERS

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
SHAPES = {0: (6, 8), 1: (6, 8, 5), 2: (6, 8, 3, 3)}


@pytest.mark.parametrize("dims", [0, 1, 2])
@pytest.mark.parametrize("name", norm_names())
def test_every_norm_at_every_rank(name, dims):
    torch.manual_seed(0)
    node = yaml.safe_load((CONFIGS / "norm" / f"{name}.yaml").read_text())
    built = instantiate(OmegaConf.create(node))  # what a model receives from the config
    assert isinstance(built, functools.partial)
    assert type(built(8, dims)) is type(create_norm_layer(name, 8, dims))
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


@pytest.mark.parametrize("name", SCHEDULERS.names())
def test_every_scheduler_starts_at_the_base_rate_stays_positive_and_resumes(name):
    def run(sch, opt, n):
        for _ in range(n):
            opt.step()
            sch.step()
        return [g["lr"] for g in opt.param_groups]

    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    sch = SCHEDULERS.create(name, opt, 10)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1)
    lrs = [run(sch, opt, 1)[0] for _ in range(4)]
    assert all(0 < lr <= 0.1 for lr in lrs), lrs
    twin_opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    twin = SCHEDULERS.create(name, twin_opt, 10)
    twin.load_state_dict(copy.deepcopy(sch.state_dict()))
    twin_opt.load_state_dict(copy.deepcopy(opt.state_dict()))
    assert run(sch, opt, 3) == run(twin, twin_opt, 3)


REGISTRIES = {"norm": norm_registry(), "optimizer": OPTIMIZERS, "scheduler": SCHEDULERS}
OPTIONS = [(g, p.stem) for g in REGISTRIES for p in sorted((CONFIGS / g).glob("*.yaml"))]


@pytest.mark.parametrize("group,option", OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_every_config_option_names_its_registry_entry_by_target(group, option):
    """One way to choose: ``_target_`` is the registered builder of the entry named like the file,
    ``_partial_`` because the framework supplies the rest, no ``name:`` indirection, and the
    file repeats the entry's preset arguments (so configs and registry cannot drift apart)."""
    node = yaml.safe_load((CONFIGS / group / f"{option}.yaml").read_text())
    entry = REGISTRIES[group].entry(option)
    assert "name" not in node and node["_partial_"] is True
    assert get_method(node["_target_"]) is entry.builder
    assert node["_target_"] == entry.target
    assert entry.preset_matches(node), (entry.defaults, node)
    assert REGISTRIES[group].find(entry.builder, node) is entry


def test_every_registry_entry_has_a_config_option():
    for group, reg in REGISTRIES.items():
        assert set(reg.names()) == {p.stem for p in (CONFIGS / group).glob("*.yaml")}, group


LEGACY = {"norm": ("shiftlab.trainers.norms.NormFactory", "batchnorm", {"eps": 1e-5, "momentum": 0.1, "sync": False}),
          "optimizer": ("shiftlab.trainers.optim.create_optimizer", "momentum", {"lr": 0.05, "weight_decay": 0.0}),
          "scheduler": ("shiftlab.trainers.optim.create_scheduler", "cosine", {"warmup_epochs": 0})}


def test_a_saved_config_in_the_old_factory_and_name_form_still_builds_the_same_module(run_cfg):
    """A run directory's .hydra/config.yaml written before the one-way configs: same layers,
    same optimizer settings, same state_dict keys, and one FutureWarning naming the new form."""
    from shiftlab.trainers.build import build_datamodule, build_module
    from shiftlab.trainers.config_checks import check_config
    from shiftlab.trainers.registry import _warned

    new = run_cfg("optimizer=momentum", "scheduler=cosine")
    old = OmegaConf.create(OmegaConf.to_container(new, resolve=False))
    for group, (target, name, options) in LEGACY.items():
        old[group] = {"_target_": target, **({} if group == "norm" else {"_partial_": True}), "name": name, **options}
    _warned.clear()
    with pytest.warns(FutureWarning) as caught:
        check_config(old, machine=False)
    texts = sorted(str(w.message) for w in caught)
    assert len(texts) == 3 and all("is deprecated; write _target_: " in t for t in texts), texts
    assert "norms.batchnorm.build" in texts[0] and "torch.optim.SGD" in texts[1] and "cosine_schedule" in texts[2]
    built = []
    for cfg in (new, old):
        dm = build_datamodule(cfg)
        dm.setup("fit")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            module = build_module(cfg, dm)
            opt = module.optimizer_factory(module.model.parameters())
            sch = module.scheduler_factory(opt, max_epochs=3)
        built.append((module, opt, sch))
    (m_new, o_new, s_new), (m_old, o_old, s_old) = built
    assert list(m_new.state_dict()) == list(m_old.state_dict())
    assert [type(m) for m in m_new.modules()] == [type(m) for m in m_old.modules()]
    drop = ("params", "initial_lr")
    assert ([{k: v for k, v in g.items() if k not in drop} for g in o_new.param_groups]
            == [{k: v for k, v in g.items() if k not in drop} for g in o_old.param_groups])
    assert type(o_old) is torch.optim.SGD and o_old.param_groups[0]["momentum"] == 0.9
    for step in (o_new.step, o_old.step, s_new.step, s_old.step):
        step()
    assert s_new.get_last_lr() == s_old.get_last_lr()


def test_an_unregistered_target_is_refused_listing_the_registered_ones(run_cfg):
    from shiftlab.trainers.config_checks import ConfigError, check_config

    cfg = run_cfg("optimizer._target_=torch.optim.Adamax")
    with pytest.raises(ConfigError) as err:
        check_config(cfg, machine=False)
    msg = str(err.value)
    assert msg.startswith("optimizer._target_=torch.optim.Adamax is not allowed; allowed: a registered optimizer")
    assert "torch.optim.SGD" in msg and "register_optimizer" in msg and "\n" not in msg
    OPTIMIZERS.register("adamax_for_test", torch.optim.Adamax)
    try:
        check_config(cfg, machine=False)
    finally:
        OPTIMIZERS._entries.pop("adamax_for_test")


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


# --- the callbacks group composes: an option holds only its own node(s) and adds to callbacks/base --------
BASE = {"model_checkpoint", "last_checkpoint", "model_summary", "rich_progress_bar", "diagnosis"}
COV = {"activation_drift", "gradient_ics", "landscape"}
BATCH = {"memorization", "noise_scale", "sharpness"}
COMPOSE = [(["callbacks=default"], BASE), (["callbacks=none"], set()), (["callbacks=sharpness"], BASE | {"sharpness"}),
           (["callbacks=[sharpness,landscape]"], BASE | {"sharpness", "landscape"}),
           (["callbacks=[none,sharpness]"], {"sharpness"}), (["~callbacks/base", "callbacks=landscape"], {"landscape"}),
           (["callbacks=covariate_shift"], BASE | COV), (["callbacks=[batch_noise,gradient_ics]"], BASE | BATCH | {"gradient_ics"}),
           (["callbacks=[batch_noise,sharpness]"], BASE | BATCH), (["callbacks=[patience_stop,sharpness]"], BASE | {"patience_stop", "sharpness"}),
           (["experiment=batch_noise"], BASE | BATCH), (["experiment=santurkar2018"], BASE | COV),
           (["experiment=learning_curve"], set())]


@pytest.mark.parametrize("overrides,nodes", COMPOSE, ids=[" ".join(o) for o, _ in COMPOSE])
def test_callbacks_options_compose(overrides, nodes):
    from conftest import compose_cfg
    from hydra.utils import instantiate

    cfg = compose_cfg(overrides)
    assert set(cfg.callbacks) == nodes
    for name in set(cfg.callbacks) - BASE:  # every probe node instantiates as composed
        assert instantiate(cfg.callbacks[name]) is not None


def test_batch_noise_keeps_its_sharpness_definition_when_combined():
    from conftest import compose_cfg

    for overrides in (["callbacks=batch_noise"], ["callbacks=[sharpness,batch_noise]"]):
        node = compose_cfg(overrides).callbacks.sharpness
        assert (node.subset, node.seed_policy, node.every_n_epochs, node.max_overhead) == ("random", "per_epoch", 10, 0.1)
    assert compose_cfg(["callbacks=sharpness"]).callbacks.sharpness.subset == "first"


@pytest.mark.parametrize("option", [o for o in _options("callbacks") if not o.endswith("_stop")])  # *_stop: stop owner
def test_callbacks_option_does_not_reinclude_the_base_set(option):
    from omegaconf import OmegaConf

    node = OmegaConf.load(CONFIGS / "callbacks" / f"{option}.yaml")
    defaults = [str(d) for d in node.get("defaults", [])]
    assert "default" not in defaults and not any("base" in d and "override" not in d for d in defaults), defaults
