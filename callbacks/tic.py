"""Takeuchi information criterion (TIC) of a mini-batch, in Cockpit's two forms, without BackPACK.

Why: TIC (Takeuchi 1976; Thomas et al. 2020, "On the interplay between noise and curvature")
compares the gradient noise with the curvature, ``tr(H^-1 C)``, where ``C`` is the uncentered
second moment of the per-example gradients and ``H`` the Hessian of the mean loss. Cockpit
tracks two cheap forms, and so do we (same ``eps``, so values are comparable):

* ``tic_diag = sum_j C_jj / (H_jj + eps)`` (Cockpit's ``TICDiag``),
* ``tic_trace = tr(C) / (tr(H) + eps)`` (Cockpit's ``TICTrace``),

with ``C_jj = mean_i g_ij^2``. ``C`` comes from the gradient tests' moments (on the layer-factor
path ``(1/N) sum_n d_nj^2 a_n^2``, BackPACK's ``SumGradSquared`` form, without the per-example
gradients). The Hessian diagonal, fastest first (``hessian_diagonal(method="auto")``):

* ``layers``: the exact Gauss-Newton diagonal from layer factors
  (:func:`~shiftlab.callbacks.per_example_layers.ggn_diagonal`, one ``C``-fold batched backward pass),
  used where it *is* the Hessian's diagonal (cross-entropy on a chain of Linear / Conv / eval-mode
  BatchNorm layers and piecewise-linear activations, e.g. ReLU MLPs); Cockpit's default is BackPACK's
  exact ``DiagHessian``, which costs about the same;
* ``exact``: one Hessian-vector product per parameter (``torch.func``: small models);
* ``hutchinson``: ``E[v * Hv]`` over Rademacher ``v`` (general models), unbiased but noisy per
  coordinate, so ``tic_diag`` from it is rough; its ``tr(H)`` comes with a standard error that
  :func:`tic_trace_se` carries over to ``tic_trace``.

The two ``torch.func`` paths stay the reference and the fallback; :class:`HessianDiagonal` records
which path ran and, under ``auto``, why the layer path was not taken.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, jvp, vmap

__all__ = ["HessianDiagonal", "hessian_diagonal_exact", "hessian_diagonal_hutchinson",
           "hessian_diagonal", "hessian_diagonal_layers", "layers_reason", "METHODS",
           "second_moment_diagonal", "tic_diag", "tic_trace", "tic_trace_se",
           "TIC_EPS"]

Loss = Callable[[Tensor, Tensor], Tensor]
TIC_EPS = 1e-7  # Cockpit's stabilizer


@dataclass
class HessianDiagonal:
    """The Hessian diagonal of a batch's mean loss (flat, ``model.parameters()`` order of the
    trainable parameters) and how it was obtained.

    ``trace_samples``: Hutchinson's per-probe ``v^T H v`` (``None`` when exact); ``method``:
    ``layers``, ``exact`` or ``hutchinson``; ``hvps``: Hessian-vector products spent;
    ``fallback_reason``: why ``auto`` did not take the layer path.
    """

    diag: Tensor
    method: str
    hvps: int
    trace_samples: Tensor | None = None
    fallback_reason: str | None = None


def _flat_loss(model: nn.Module, x: Tensor, y: Tensor, loss: Loss) -> tuple[Callable, Tensor]:
    """``(f, theta)``: the mean loss on ``(x, y)`` as a function of the flat trainable parameters."""
    train = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    if not train:
        raise ValueError("model has no trainable parameters")
    fixed = {n: p.detach() for n, p in model.named_parameters() if not p.requires_grad}
    fixed.update(dict(model.named_buffers()))
    theta = torch.cat([v.reshape(-1) for v in train.values()])

    def f(flat: Tensor) -> Tensor:
        params, i = {}, 0
        for n, v in train.items():
            params[n] = flat[i:i + v.numel()].view_as(v)
            i += v.numel()
        return loss(functional_call(model, {**fixed, **params}, (x,)), y)

    return f, theta


def _hvps(f: Callable, theta: Tensor, V: Tensor, chunk_size: int | None) -> Tensor:
    """Rows ``H v`` for the rows ``v`` of ``V`` (forward-over-reverse, one ``vmap``)."""
    g = grad(f)

    def hvp(v: Tensor) -> Tensor:
        return jvp(g, (theta,), (v,))[1]

    with torch.enable_grad():
        return vmap(hvp, chunk_size=chunk_size)(V).detach()


def hessian_diagonal_exact(model: nn.Module, x: Tensor, y: Tensor, loss: Loss = F.cross_entropy,
                           chunk_size: int = 256) -> HessianDiagonal:
    """``diag(H)`` exactly: ``H e_j`` for every basis vector, ``chunk_size`` at a time (memory
    ``chunk_size x P``). ``P`` products: only for small models."""
    f, theta = _flat_loss(model, x, y, loss)
    p = theta.numel()
    out = torch.empty(p, dtype=theta.dtype, device=theta.device)
    for lo in range(0, p, chunk_size):
        hi = min(lo + chunk_size, p)
        basis = torch.zeros(hi - lo, p, dtype=theta.dtype, device=theta.device)
        basis[torch.arange(hi - lo), torch.arange(lo, hi)] = 1
        out[lo:hi] = _hvps(f, theta, basis, None)[:, lo:hi].diagonal()
    return HessianDiagonal(out, "exact", p)


def hessian_diagonal_hutchinson(model: nn.Module, x: Tensor, y: Tensor,
                                loss: Loss = F.cross_entropy, samples: int = 20,
                                generator: torch.Generator | None = None,
                                chunk_size: int | None = None) -> HessianDiagonal:
    """Hutchinson's diagonal ``mean_k v_k * H v_k`` over ``samples`` Rademacher probes (Bekas et
    al. 2007), drawn on the CPU from ``generator`` (the same seed gives the same probes on every
    rank, so per-rank estimates can be averaged into the union batch's)."""
    if samples < 2:
        raise ValueError(f"samples={samples} is not allowed; allowed: an integer >= 2")
    f, theta = _flat_loss(model, x, y, loss)
    V = (torch.randint(0, 2, (samples, theta.numel()), generator=generator) * 2 - 1).to(theta)
    HV = _hvps(f, theta, V, chunk_size)
    prod = V * HV
    return HessianDiagonal(prod.mean(0), "hutchinson", samples, prod.sum(1).double())


METHODS = ("auto", "layers", "exact", "hutchinson")


def _is_mean_cross_entropy(loss: Loss) -> bool:
    """The layer path's Gauss-Newton factors are those of the mean softmax cross-entropy."""
    if loss is F.cross_entropy:
        return True
    return (isinstance(loss, nn.CrossEntropyLoss) and loss.reduction == "mean" and loss.weight is None
            and loss.label_smoothing == 0.0)


def layers_reason(model: nn.Module, loss: Loss) -> str | None:
    """None when :func:`hessian_diagonal_layers` may apply (checked without a forward pass), else why not."""
    from shiftlab.callbacks.per_example_layers import ggn_static_reason

    if not _is_mean_cross_entropy(loss):
        return "the loss is not the mean cross-entropy"
    return ggn_static_reason(model)


def hessian_diagonal_layers(model: nn.Module, x: Tensor, y: Tensor,
                            loss: Loss = F.cross_entropy) -> HessianDiagonal:
    """``diag(H)`` as the exact Gauss-Newton diagonal from layer factors; raises ValueError where that is
    not the Hessian's diagonal (:func:`~shiftlab.callbacks.per_example_layers.ggn_diagonal`)."""
    from shiftlab.callbacks.per_example_layers import ggn_diagonal

    why = layers_reason(model, loss)
    if why:
        raise ValueError(f"the layer path does not apply: {why}")
    with torch.enable_grad():
        g = ggn_diagonal(model, x, y)
    if not g.equals_hessian_diagonal:
        raise ValueError(f"the layer path does not apply: {g.reason}")
    return HessianDiagonal(g.diag.detach(), "layers", 0)


def hessian_diagonal(model: nn.Module, x: Tensor, y: Tensor, loss: Loss = F.cross_entropy,
                     method: str = "auto", max_exact_params: int = 1024, samples: int = 20,
                     generator: torch.Generator | None = None,
                     chunk_size: int | None = None) -> HessianDiagonal:
    """``layers``, ``exact``, ``hutchinson``, or ``auto``: the layer path where it is the Hessian's
    diagonal, else exact up to ``max_exact_params`` parameters, else Hutchinson."""
    if method not in METHODS:
        raise ValueError(f"method={method} is not allowed; allowed: {', '.join(METHODS)}")
    if method == "layers":
        return hessian_diagonal_layers(model, x, y, loss)
    from shiftlab.callbacks.per_example_layers import NotApplicable

    why = None
    if method == "auto":
        why = layers_reason(model, loss)
        if why is None:
            try:
                return hessian_diagonal_layers(model, x, y, loss)
            except ValueError as e:  # found on the forward pass (not a chain of layers, a layer called twice)
                why = str(e).removeprefix("the layer path does not apply: ")
            except NotApplicable as e:
                why = str(e)
    n = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if method == "exact" or (method == "auto" and n <= max_exact_params):
        out = hessian_diagonal_exact(model, x, y, loss, chunk_size or 256)
    else:
        out = hessian_diagonal_hutchinson(model, x, y, loss, samples, generator, chunk_size)
    out.fallback_reason = why
    return out


def second_moment_diagonal(G: Tensor) -> Tensor:
    """``C_jj = mean_i g_ij^2`` of per-example gradients ``G`` (N, P), in float64."""
    return G.double().square().mean(0)


def tic_diag(c_diag: Tensor, h_diag: Tensor, eps: float = TIC_EPS) -> float:
    """``sum_j C_jj / (H_jj + eps)`` (Cockpit's ``TICDiag``; ``H_jj`` is not clipped, as there)."""
    return float((c_diag.double() / (h_diag.double() + eps)).sum())


def tic_trace(c_diag: Tensor, h_diag: Tensor, eps: float = TIC_EPS) -> float:
    """``tr(C) / (tr(H) + eps)`` (Cockpit's ``TICTrace``)."""
    return float(c_diag.double().sum() / (h_diag.double().sum() + eps))


def tic_trace_se(value: float, trace_samples: Tensor | None) -> float:
    """Standard error of :func:`tic_trace` from the Hutchinson samples of ``tr(H)`` (delta
    method; ``C`` is exact for the batch): ``|TIC| * se(tr H) / |tr H|``; 0 for an exact diagonal."""
    if trace_samples is None:
        return 0.0
    t = trace_samples.double()
    se = float(t.std() / math.sqrt(t.numel()))
    return abs(value) * se / abs(float(t.mean())) if float(t.mean()) != 0 else math.inf
