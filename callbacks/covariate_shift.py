"""Internal-covariate-shift and landscape measures as plain functions on a model and a batch.

Why plain functions: each measure is checked in tests against an independent computation on a
tiny network, with no Trainer involved; the Lightning callbacks (``callbacks/activation_drift.py``,
``gradient_ics.py``, ``landscape.py``, on :class:`shiftlab.callbacks.probe.Probe`) only decide *when*
to call them and where to log.

* :func:`activation_drift` -- Ioffe & Szegedy 2015, Fig. 1: percentiles (15/50/85), mean and std
  of each normalization layer's input and output.
* :func:`gradient_ics` -- Santurkar et al. 2018, Def. 2.1: for weight layer ``i``,
  ``G = grad_{W_i} L`` at step ``t`` and ``G'`` = the same gradient on the same batch after every
  parameter *before* layer ``i`` (in forward order) took its step-``t`` update with the run's own
  optimizer (a clone carrying its real state: momentum buffers, Adam moments, step counts, the
  current learning rate). Reports ``||G - G'||_2`` and ``cos(G, G')``.
* :func:`landscape_smoothness` -- Santurkar et al. 2018, Sec. 3.1 / App. A.2.2: along the
  gradient ``g`` for step sizes ``eta``: the range of ``L(w - eta g)`` (loss variation), the
  range of ``||grad L(w) - grad L(w - eta g)||`` (gradient predictiveness) and the effective
  beta-smoothness ``max_eta ||grad L(w) - grad L(w - eta g)|| / ||eta g||``.

None of them changes the model, its buffers (BN running statistics), ``.grad``, the optimizer or
the global RNG streams: the gradient probes work on a deep copy (a "shadow") and every forward of
the shadow restarts from the RNG state saved on entry, so noise layers (noisy BN, dropout) draw the
same realisation as the real training step will, and the state is restored on exit. The forward
passes run in the model's current mode (training mode during training: batch statistics).
"""
from __future__ import annotations

import contextlib
import copy
import math
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm

LossFn = Callable[[Tensor, Tensor], Tensor]
NORM_TYPES: tuple[type, ...] = (_BatchNorm, _InstanceNorm, nn.GroupNorm, nn.LayerNorm, nn.Identity)
WEIGHT_TYPES: tuple[type, ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
STAT_KEYS = ("p15", "p50", "p85", "mean", "std")
QUANTILE_SAMPLE = 1 << 14  # percentiles from an evenly strided subsample of at most this many elements


# ------------------------------------------------------------------------------- RNG / shadow
def _rng_devices() -> list[int]:
    return list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []


def get_rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = [torch.cuda.get_rng_state(d) for d in _rng_devices()]
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["cpu"])
    for d, s in zip(_rng_devices(), state.get("cuda", [])):
        torch.cuda.set_rng_state(s, d)


@contextlib.contextmanager
def preserved_rng() -> Iterator[dict[str, Any]]:
    """Yield the RNG state on entry; restore it on exit (the probe consumes no randomness)."""
    state = get_rng_state()
    try:
        yield state
    finally:
        set_rng_state(state)


def clone_optimizer(opt: torch.optim.Optimizer, src: nn.Module, dst: nn.Module) -> torch.optim.Optimizer:
    """A copy of ``opt`` (same class, hyper-parameters and state) acting on ``dst``'s parameters.

    ``dst`` must be a deep copy of ``src`` (parameters in the same order).
    """
    mapping = {id(p): q for p, q in zip(src.parameters(), dst.parameters())}
    groups = []
    for g in opt.param_groups:
        missing = [p for p in g["params"] if id(p) not in mapping]
        if missing:
            raise ValueError("clone_optimizer: the optimizer holds parameters that are not in the model")
        groups.append({**{k: v for k, v in g.items() if k != "params"},
                       "params": [mapping[id(p)] for p in g["params"]]})
    try:
        new = type(opt)(groups, **opt.defaults)
    except TypeError:
        new = type(opt)(groups)
    new.load_state_dict(copy.deepcopy(opt.state_dict()))
    return new


class _Shadow:
    """A deep copy of a model whose parameters and buffers can be reset to the original's."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> None:
        self.model = copy.deepcopy(model)
        for p in self.model.parameters():
            p.grad = None
        self.snapshot = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        self.optimizer = clone_optimizer(optimizer, model, self.model) if optimizer is not None else None
        self.opt_state = copy.deepcopy(self.optimizer.state_dict()) if optimizer is not None else None

    @torch.no_grad()
    def reset(self) -> None:
        for k, v in self.model.state_dict().items():
            v.copy_(self.snapshot[k])
        for p in self.model.parameters():
            p.grad = None
        if self.optimizer is not None:
            self.optimizer.load_state_dict(copy.deepcopy(self.opt_state))


def _loss_and_grads(model: nn.Module, loss_fn: LossFn, x: Tensor, y: Tensor, params: Sequence[Tensor],
                    rng: dict[str, Any]) -> tuple[float, list[Tensor]]:
    set_rng_state(rng)
    with torch.enable_grad():
        loss = loss_fn(model(x), y)
        grads = torch.autograd.grad(loss, list(params), allow_unused=True)
    return float(loss.detach()), [torch.zeros_like(p) if g is None else g.detach() for p, g in zip(params, grads)]


# ------------------------------------------------------------------------------- layer discovery
def norm_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The normalization slots of ``model``: BN/GN/LN/IN modules and the ``nn.Identity`` that
    ``norm=none`` puts where a norm layer would go (so drift is comparable with and without BN)."""
    return [(n, m) for n, m in model.named_modules() if n and isinstance(m, NORM_TYPES)]


@contextlib.contextmanager
def _recording_order(model: nn.Module) -> Iterator[list[str]]:
    """Collect the names of parameter-owning modules in the order the forward first calls them."""
    order: list[str] = []
    handles = []
    for name, mod in model.named_modules():
        if any(True for _ in mod.parameters(recurse=False)):
            def hook(_m, _inp, _out, name=name):
                if name not in order:
                    order.append(name)
            handles.append(mod.register_forward_hook(hook))
    try:
        yield order
    finally:
        for h in handles:
            h.remove()


def forward_order(model: nn.Module, x: Tensor) -> list[str]:
    """Names of the parameter-owning modules in the order a forward pass first calls them.

    Runs one forward of a deep copy (so running statistics and RNG are untouched)."""
    shadow = copy.deepcopy(model)
    with _recording_order(shadow) as order, preserved_rng(), torch.no_grad():
        shadow(x)
    return order


def _weight_names(model: nn.Module, order: Sequence[str]) -> list[str]:
    mods = dict(model.named_modules())
    return [n for n in order if isinstance(mods[n], WEIGHT_TYPES)]


def weight_layers(model: nn.Module, x: Tensor) -> list[str]:
    """Linear / conv layers in forward order: the ``W_1, W_2, ...`` of Def. 2.1 (1-based)."""
    return _weight_names(model, forward_order(model, x))


# ------------------------------------------------------------------------------- 1. activation drift
def distribution_stats(t: Tensor, prefix: str = "", max_quantile_elements: int = QUANTILE_SAMPLE) -> dict[str, float]:
    """15/50/85th percentiles, mean and std of the elements of ``t``.

    Mean and std use every element; the percentiles (a sort) use an evenly strided subsample of at
    most ``max_quantile_elements`` elements, which keeps the probe cheap on conv activations."""
    flat = t.detach().reshape(-1).float()
    sub = flat[:: math.ceil(flat.numel() / max_quantile_elements)] if flat.numel() > max_quantile_elements else flat
    q = torch.quantile(sub, torch.tensor([0.15, 0.50, 0.85], device=flat.device))
    vals = [float(v) for v in q] + [float(flat.mean()), float(flat.std(correction=0))]
    return {f"{prefix}{k}": v for k, v in zip(STAT_KEYS, vals)}


def activation_drift(model: nn.Module, x: Tensor, layers: Sequence[str] | None = None,
                     unit: int | None = None, train_mode: bool = False) -> dict[str, float]:
    """Distribution statistics of each norm layer's input and output on the batch ``x``.

    Keys ``"<layer>/in/p15"``, ``.../out/std`` etc. ``unit``: restrict to one channel / hidden unit
    (Ioffe & Szegedy follow a single sigmoid's input); None pools all units.
    ``train_mode=False`` (default) evaluates in eval mode (running statistics, no noise); with True
    a deep copy runs in training mode so the real running statistics do not move.
    """
    target = copy.deepcopy(model) if train_mode else model
    wanted = dict(norm_layers(target))
    if layers is not None:
        unknown = [n for n in layers if n not in wanted]
        if unknown:
            raise ValueError(f"activation_drift: layers {unknown} are not norm layers; known: {', '.join(wanted)}")
        wanted = {n: wanted[n] for n in layers}
    out: dict[str, float] = {}

    def pick(t: Tensor) -> Tensor:
        return t if unit is None else t[:, unit]

    def hook(mod, inp, outp, name):
        out.update(distribution_stats(pick(inp[0]), f"{name}/in/"))
        out.update(distribution_stats(pick(outp), f"{name}/out/"))

    handles = [m.register_forward_hook(lambda mod, i, o, n=n: hook(mod, i, o, n)) for n, m in wanted.items()]
    flags = [(m, m.training) for m in target.modules()]
    target.train(train_mode)
    try:
        with preserved_rng(), torch.no_grad():
            target(x)
    finally:
        for h in handles:
            h.remove()
        for m, t in flags:
            m.training = t
    return out


# ------------------------------------------------------------------------------- 2. gradient ICS
def gradient_ics(model: nn.Module, loss_fn: LossFn, x: Tensor, y: Tensor, optimizer: torch.optim.Optimizer,
                 layers: Sequence[int] | None = None) -> dict[str, dict[str, float]]:
    """Santurkar et al.'s ICS of the weight layers ``layers`` (1-based; default all but the first).

    Returns ``{layer_name: {"l2": ||G - G'||, "cos": cos(G, G'), "grad_norm": ||G||, "index": i}}``.
    """
    results: dict[str, dict[str, float]] = {}
    with preserved_rng() as rng:
        shadow = _Shadow(model, optimizer)
        mods = dict(shadow.model.named_modules())
        params = [p for p in shadow.model.parameters() if p.requires_grad]
        with _recording_order(shadow.model) as order:
            _, g_all = _loss_and_grads(shadow.model, loss_fn, x, y, params, rng)
        grad_of = {id(p): g for p, g in zip(params, g_all)}
        names = _weight_names(shadow.model, order)
        idx = list(layers) if layers is not None else list(range(2, len(names) + 1))
        bad = [i for i in idx if not 1 <= int(i) <= len(names)]
        if bad:
            raise ValueError(f"gradient_ics: layers {bad} out of range 1..{len(names)} "
                             "(weight layers in forward order)")
        for i in idx:
            name = names[int(i) - 1]
            w = mods[name].weight
            earlier = {id(p) for n in order[: order.index(name)] for p in mods[n].parameters(recurse=False)}
            shadow.reset()
            for p in params:
                p.grad = grad_of[id(p)].clone() if id(p) in earlier else None
            shadow.optimizer.step()
            shadow.model.zero_grad(set_to_none=True)
            _, (g_new,) = _loss_and_grads(shadow.model, loss_fn, x, y, [w], rng)
            g_old = grad_of[id(w)]
            diff = float((g_old - g_new).norm())
            n_old, n_new = float(g_old.norm()), float(g_new.norm())
            cos = float((g_old * g_new).sum()) / (n_old * n_new) if n_old > 0 and n_new > 0 else float("nan")
            results[name] = {"l2": diff, "cos": cos, "grad_norm": n_old, "index": float(i)}
        del shadow
    return results


# ------------------------------------------------------------------------------- 3. landscape
def landscape_smoothness(model: nn.Module, loss_fn: LossFn, x: Tensor, y: Tensor,
                         etas: Sequence[float]) -> dict[str, Any]:
    """Loss variation, gradient predictiveness and effective beta-smoothness along ``-grad L``.

    All trainable parameters move: ``w - eta * g`` with ``g = grad L(w)`` on this batch.
    Scalars: ``loss``, ``loss_min``, ``loss_max``, ``loss_range`` (over the etas),
    ``grad_diff_min``, ``grad_diff_max``, ``beta_smoothness``; lists per eta: ``etas``, ``losses``,
    ``grad_diffs``.
    """
    if not etas or any(e <= 0 for e in etas):
        raise ValueError(f"landscape_smoothness: etas must be positive step sizes, got {list(etas)}")
    with preserved_rng() as rng:
        shadow = _Shadow(model)
        params = [p for p in shadow.model.parameters() if p.requires_grad]
        loss0, g0 = _loss_and_grads(shadow.model, loss_fn, x, y, params, rng)
        g_norm = math.sqrt(sum(float((g * g).sum()) for g in g0))
        losses, diffs = [], []
        for eta in etas:
            shadow.reset()
            with torch.no_grad():
                for p, g in zip(params, g0):
                    p.sub_(eta * g)
            loss_e, g_e = _loss_and_grads(shadow.model, loss_fn, x, y, params, rng)
            losses.append(loss_e)
            diffs.append(math.sqrt(sum(float(((a - b) ** 2).sum()) for a, b in zip(g0, g_e))))
        del shadow
    betas = [d / (e * g_norm) if g_norm > 0 else float("nan") for d, e in zip(diffs, etas)]
    return {
        "loss": loss0, "grad_norm": g_norm,
        "loss_min": min(losses), "loss_max": max(losses), "loss_range": max(losses) - min(losses),
        "grad_diff_min": min(diffs), "grad_diff_max": max(diffs), "beta_smoothness": max(betas),
        "etas": [float(e) for e in etas], "losses": losses, "grad_diffs": diffs,
    }
