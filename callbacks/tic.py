"""Takeuchi information criterion (TIC) of a mini-batch, in Cockpit's two forms, without BackPACK.

Why: TIC (Takeuchi 1976; Thomas et al. 2020, "On the interplay between noise and curvature")
compares the gradient noise with the curvature, ``tr(H^-1 C)``, where ``C`` is the uncentered
second moment of the per-example gradients and ``H`` the Hessian of the mean loss. Cockpit
tracks two cheap forms, and so do we (same ``eps``, so values are comparable):

* ``tic_diag = sum_j C_jj / (H_jj + eps)`` (Cockpit's ``TICDiag``),
* ``tic_trace = tr(C) / (tr(H) + eps)`` (Cockpit's ``TICTrace``),

with ``C_jj = mean_i g_ij^2``. ``C`` comes from the per-example gradients the gradient tests
already form; the Hessian diagonal is either exact (one Hessian-vector product per parameter,
``torch.func``: small models) or Hutchinson's estimate ``E[v * Hv]`` over Rademacher ``v``
(general models), which is unbiased but noisy per coordinate, so ``tic_diag`` from it is rough;
its ``tr(H)`` comes with a standard error that :func:`tic_trace_se` carries over to ``tic_trace``.
Cockpit's default is BackPACK's exact ``DiagHessian``.
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
           "hessian_diagonal", "second_moment_diagonal", "tic_diag", "tic_trace", "tic_trace_se",
           "TIC_EPS"]

Loss = Callable[[Tensor, Tensor], Tensor]
TIC_EPS = 1e-7  # Cockpit's stabilizer


@dataclass
class HessianDiagonal:
    """The Hessian diagonal of a batch's mean loss (flat, ``model.parameters()`` order of the
    trainable parameters) and how it was obtained.

    ``trace_samples``: Hutchinson's per-probe ``v^T H v`` (``None`` when exact); ``method``:
    ``exact`` or ``hutchinson``; ``hvps``: Hessian-vector products spent.
    """

    diag: Tensor
    method: str
    hvps: int
    trace_samples: Tensor | None = None


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


def hessian_diagonal(model: nn.Module, x: Tensor, y: Tensor, loss: Loss = F.cross_entropy,
                     method: str = "auto", max_exact_params: int = 1024, samples: int = 20,
                     generator: torch.Generator | None = None,
                     chunk_size: int | None = None) -> HessianDiagonal:
    """``exact``, ``hutchinson``, or ``auto``: exact up to ``max_exact_params`` parameters."""
    if method not in ("auto", "exact", "hutchinson"):
        raise ValueError(f"method={method} is not allowed; allowed: auto, exact, hutchinson")
    n = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if method == "exact" or (method == "auto" and n <= max_exact_params):
        return hessian_diagonal_exact(model, x, y, loss, chunk_size or 256)
    return hessian_diagonal_hutchinson(model, x, y, loss, samples, generator, chunk_size)


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
