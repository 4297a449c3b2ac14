"""Gradient statistics from per-example gradients: the gradient tests Cockpit reports, without BackPACK.

Why per-example gradients: every quantity here is a moment of the ``N`` individual gradients
``g_i`` of one mini-batch (the batch gradient is their mean ``g``), so one ``torch.func`` pass
(``vmap`` over ``grad``) gives them all; each statistic is then a few reductions.

Two paths give the moments (:func:`batch_moments`, which logs the one it took): ``vmap`` over
``grad`` (the reference, any model whose examples do not interact) and, to meet a cost target
(Cockpit's norm test cost a fraction of the ``vmap`` pass), the layer-factor path of
:mod:`shiftlab.callbacks.per_example_layers`, used automatically when every trainable parameter
belongs to a ``Linear``, ``Conv1d``/``Conv2d`` or eval-mode BatchNorm layer: it gets the same moments from one forward
and one backward pass without forming the per-example gradients.

Conventions follow Cockpit (Schneider et al. 2021) so values are comparable, with ``N`` the batch
size and sample variances over examples (divisor ``N - 1``):

* ``norm_test`` (Byrd et al. 2012, eq. 3.9): ``theta = sqrt(sum|g_i - g|^2 / (N-1) / N) / |g|``,
  the smallest ``theta`` for which the norm test passes.
* ``inner_product_test`` (Bollapragada et al. 2018, eq. 2.6):
  ``sqrt(Var_i(<g_i, g>) / N) / |g|^2``.
* ``orthogonality_test`` (Bollapragada et al. 2018, eq. 3.3):
  ``sqrt(sum|g_i - <g_i,g> g/|g|^2|^2 / (N-1) / N) / |g|``.
* ``gsnr``: mean over parameters of ``g_j^2 / (mean_i g_ij^2 - g_j^2 + eps)`` (Cockpit's
  ``MeanGSNR``, population variance, ``eps = 1e-5``).
* ``eb_criterion`` (Mahsereci et al. 2017, eq. 7): ``1 - (N/D) sum_j g_j^2 / (s_j^2 + eps)`` with
  ``s_j^2`` the per-parameter sample variance and ``D`` the number of parameters; > 0 means the
  gradient is indistinguishable from noise, i.e. stop.
* ``b_simple`` (McCandlish et al. 2018): the estimator of
  :func:`shiftlab.callbacks.gradient_noise.b_simple_from_batch_grads` with batches of one example
  (through its ``b_simple_from_moments``, the same code the noise-scale callback runs).
* ``alpha`` (Cockpit's normalized step length): a noise-aware quadratic fitted along the update
  ``d = theta_1 - theta_0`` to the losses and projected gradients at both ends; ``0`` means the
  step landed on the fitted minimum, ``1`` that it overshot to the same height (see
  :func:`alpha_from_fit`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from shiftlab.callbacks.gradient_noise import b_simple_from_moments

__all__ = [
    "per_example_gradients",
    "BatchMoments",
    "batch_moments",
    "PATHS",
    "GradientMoments",
    "gradient_moments",
    "norm_test",
    "inner_product_test",
    "orthogonality_test",
    "gsnr",
    "eb_criterion",
    "b_simple",
    "alpha_from_fit",
    "alpha_from_gradients",
    "alpha_from_projections",
    "snapshot",
    "per_example_directional",
    "STATISTICS",
]

Loss = Callable[[Tensor, Tensor], Tensor]


def per_example_gradients(model: nn.Module, x: Tensor, y: Tensor, loss: Loss = F.cross_entropy,
                          chunk_size: int | None = None) -> tuple[Tensor, Tensor]:
    """``(G, losses)``: the flattened gradients ``(N, P)`` of each example's loss w.r.t. the
    trainable parameters (in ``model.parameters()`` order) and the ``N`` losses.

    One ``vmap(grad(...))`` call. The model must be a function of one example at a time: put a
    BatchNorm model in eval mode first (in train mode its output couples the examples, so
    per-example gradients are not defined; BackPACK has the same limit).
    """
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    if not names:
        raise ValueError("model has no trainable parameters")
    train = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    fixed = {n: p for n, p in model.named_parameters() if not p.requires_grad}
    fixed.update(dict(model.named_buffers()))

    def one(p: dict[str, Tensor], xi: Tensor, yi: Tensor) -> tuple[Tensor, Tensor]:
        out = functional_call(model, {**fixed, **p}, (xi.unsqueeze(0),))
        value = loss(out, yi.unsqueeze(0))
        return value, value.detach()

    with torch.enable_grad():
        grads, losses = vmap(grad(one, has_aux=True), in_dims=(None, 0, 0),
                             chunk_size=chunk_size)(train, x, y)
    return torch.cat([grads[n].reshape(x.shape[0], -1) for n in names], 1), losses


@dataclass
class GradientMoments:
    """The reductions of ``G`` every statistic needs (float64; ``G`` itself is not kept)."""

    n: int  # batch size N
    d: int  # parameters D
    grad: Tensor  # g = mean_i g_i, (D,)
    sq_norms: Tensor  # |g_i|^2, (N,)
    dots: Tensor  # <g_i, g>, (N,)
    coord_sq_mean: Tensor  # mean_i g_ij^2, (D,)

    @property
    def grad_sq(self) -> float:
        return float(self.grad @ self.grad)


def gradient_moments(G: Tensor) -> GradientMoments:
    """One pass over ``G`` in its own dtype (a float64 copy of a 128 x 23k ``G`` cost more than
    all the statistics); the reduced vectors are returned in float64."""
    if G.dim() != 2 or G.shape[0] < 2:
        raise ValueError(f"per-example gradients must have shape (N>=2, D), got {tuple(G.shape)}")
    mean = G.mean(0)
    return GradientMoments(G.shape[0], G.shape[1], mean.double(),
                           torch.linalg.vector_norm(G, dim=1).double() ** 2, (G @ mean).double(),
                           G.square().mean(0).double())


PATHS = ("auto", "layers", "vmap")


@dataclass
class BatchMoments:
    """What :func:`batch_moments` measured, and how."""

    moments: GradientMoments
    losses: Tensor  # (N,) per-example losses
    gradients: Tensor | None  # (N, D) per-example gradients, when asked for
    path: str  # "layers" (per-layer factors) or "vmap" (torch.func)
    fallback_reason: str | None  # why the layer path was not taken (path "vmap" under "auto")


def batch_moments(model: nn.Module, x: Tensor, y: Tensor, loss: Loss = F.cross_entropy,
                  chunk_size: int | None = None, path: str = "auto",
                  gradients: bool = False) -> BatchMoments:
    """The moments of the per-example gradients of ``loss`` on ``(x, y)`` by the cheapest exact path.

    ``path``: ``auto`` (layer factors when
    :func:`~shiftlab.callbacks.per_example_layers.fast_path_reason` allows, else ``vmap``), ``layers``
    (raise if not applicable) or ``vmap`` (the reference). ``gradients``: also return ``G`` (on the
    layer path built from the factors, still without ``vmap``). Put the model in eval mode first
    when it has BatchNorm (as :func:`per_example_gradients` needs)."""
    from shiftlab.callbacks import per_example_layers as pel

    if path not in PATHS:
        raise ValueError(f"path={path!r} is not allowed; allowed: {', '.join(PATHS)}")
    why = None if path == "vmap" else pel.fast_path_reason(model)
    if path == "layers" and why:
        raise ValueError(f"the layer path does not apply: {why}")
    if path != "vmap" and why is None:
        try:
            if gradients:  # moments from the factors, G written block by block (one pass)
                m, G, losses = pel.layer_moments_and_gradients(model, x, y, loss)
                return BatchMoments(m, losses, G, "layers", None)
            m, losses = pel.layer_moments(model, x, y, loss)
            return BatchMoments(m, losses, None, "layers", None)
        except pel.NotApplicable as e:  # found in the forward pass (a layer called twice, an in-place change)
            if path == "layers":
                raise ValueError(f"the layer path does not apply: {e}") from None
            why = str(e)
    G, losses = per_example_gradients(model, x, y, loss, chunk_size)
    return BatchMoments(gradient_moments(G), losses, G if gradients else None, "vmap", why)


def _nan_if_zero(den: float) -> float:
    return den if den > 0 else math.nan


def norm_test(m: GradientMoments) -> float:
    """Byrd et al. (2012): smallest theta with ``Var_i|g_i| / N <= theta^2 |g|^2``."""
    var_l1 = float(m.sq_norms.sum() - m.n * m.grad_sq) / (m.n - 1)
    return math.sqrt(max(var_l1, 0.0) / m.n / _nan_if_zero(m.grad_sq))


def inner_product_test(m: GradientMoments) -> float:
    """Bollapragada et al. (2018), eq. 2.6: smallest theta for the inner-product test."""
    var = float((m.dots ** 2).sum() - m.n * m.grad_sq ** 2) / (m.n - 1)
    return math.sqrt(max(var, 0.0) / m.n / _nan_if_zero(m.grad_sq ** 2))


def orthogonality_test(m: GradientMoments) -> float:
    """Bollapragada et al. (2018), eq. 3.3: smallest nu for the orthogonality test."""
    gs = _nan_if_zero(m.grad_sq)
    var = float(m.sq_norms.sum() - (m.dots ** 2).sum() / gs) / (m.n - 1)
    return math.sqrt(max(var, 0.0) / m.n / gs)


def gsnr(m: GradientMoments, eps: float = 1e-5) -> float:
    """Mean gradient signal-to-noise ratio over parameters (Cockpit's ``MeanGSNR``)."""
    g2 = m.grad ** 2
    return float((g2 / (m.coord_sq_mean - g2 + eps)).mean())


def eb_criterion(m: GradientMoments, eps: float = 1e-5) -> float:
    """Mahsereci et al. (2017), eq. 7: ``1 - (N/D) sum_j g_j^2 / s_j^2``; stop when > 0."""
    g2 = m.grad ** 2
    var = (m.n * m.coord_sq_mean - m.n * g2) / (m.n - 1)
    return float(1.0 - m.n * (g2 / (var + eps)).mean())


def b_simple(m: GradientMoments) -> float:
    """McCandlish et al. (2018) ``tr(Sigma)/|G|^2`` from the batch's per-example gradients."""
    s = float(m.sq_norms.sum() - m.n * m.grad_sq) / (m.n - 1)  # sum|g_i - g|^2 / (N-1)
    return b_simple_from_moments(s, m.grad_sq, m.n, batch_size=1).b_simple


STATISTICS: dict[str, Callable[[GradientMoments], float]] = {
    "b_simple": b_simple,
    "norm_test": norm_test,
    "inner_product_test": inner_product_test,
    "orthogonality_test": orthogonality_test,
    "gsnr": gsnr,
    "eb_criterion": eb_criterion,
}


def alpha_from_fit(t: float, fs: tuple[float, float], dfs: tuple[float, float],
                   var_fs: tuple[float, float], var_dfs: tuple[float, float]) -> float:
    """Cockpit's normalized step length from a weighted least-squares quadratic
    ``f(s) = w0 + w1 s + w2 s^2`` through the losses ``fs`` and directional derivatives ``dfs``
    at ``s = 0`` and ``s = t`` (``t = |d|``), weighted by their variances.

    ``alpha = 2 t / s_bar - 1`` with ``s_bar = -w1 / w2`` the step that lands on the parabola's
    far side at the starting height: ``-1`` no progress beyond the start, ``0`` the step reached
    the minimum, ``1`` it overshot to the same height on the other side, ``> 1`` the loss rose.
    Returns ``-1`` when the fit is concave or the step is zero (as Cockpit does), NaN when singular.
    """
    if t == 0.0:
        return -1.0
    phi = np.array([[1, 0, 0], [1, t, t * t], [0, 1, 0], [0, 1, 2 * t]], dtype=float).T
    var = np.array([*var_fs, *var_dfs], dtype=float)
    var[var == 0] = 1e-10
    w = np.diag(1.0 / var)
    try:
        mu = np.linalg.solve(phi @ w @ phi.T, phi @ w @ np.array([*fs, *dfs], dtype=float))
    except np.linalg.LinAlgError:
        return math.nan
    if mu[2] < 0:
        return -1.0
    return float(2 * t / (-mu[1] / mu[2]) - 1)


def alpha_from_gradients(step: Tensor, losses0: Tensor, G0: Tensor, losses1: Tensor,
                         G1: Tensor) -> float:
    """:func:`alpha_from_fit` for the update ``step = theta_1 - theta_0`` (flat), with the
    per-example losses and gradients of the batches seen at ``theta_0`` and ``theta_1``:
    means and sample variances of the losses and of the projections ``<g_i, d/|d|>``."""
    t = float(step.double().norm())
    if t == 0.0:
        return -1.0
    u = step.double() / t
    return alpha_from_projections(t, losses0, G0.double() @ u, losses1, G1.double() @ u)


def alpha_from_projections(t: float, losses0: Tensor, p0: Tensor, losses1: Tensor,
                           p1: Tensor) -> float:
    """:func:`alpha_from_fit` from per-example losses and projected gradients at both ends."""
    if t == 0.0:
        return -1.0
    return alpha_from_fit(t, (float(losses0.mean()), float(losses1.mean())),
                          (float(p0.mean()), float(p1.mean())),
                          (float(losses0.var()), float(losses1.var())),
                          (float(p0.var()), float(p1.var())))


def snapshot(model: nn.Module) -> dict[str, dict[str, Tensor]]:
    """Copies of the trainable parameters and of everything else the forward pass reads
    (frozen parameters, buffers), to evaluate the model later at this point."""
    return {"params": {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad},
            "fixed": {**{n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad},
                      **{n: b.clone() for n, b in model.named_buffers()}}}


def per_example_directional(model: nn.Module, x: Tensor, y: Tensor, direction: dict[str, Tensor],
                            loss: Loss = F.cross_entropy,
                            at: dict[str, dict[str, Tensor]] | None = None) -> tuple[Tensor, Tensor]:
    """``(losses, <g_i, direction>)`` for every example in one forward-mode pass (``jvp``), at the
    model's current point or at a :func:`snapshot` ``at``.

    Why: alpha needs the per-example gradients only projected on the update, and a
    Jacobian-vector product gives those projections at the cost of about one forward pass,
    without forming the ``N x P`` per-example gradients.
    """
    point = at or snapshot(model)

    def one(p: dict[str, Tensor], xi: Tensor, yi: Tensor) -> Tensor:
        return loss(functional_call(model, {**point["fixed"], **p}, (xi.unsqueeze(0),)), yi.unsqueeze(0))

    def losses(p: dict[str, Tensor]) -> Tensor:
        return vmap(one, in_dims=(None, 0, 0))(p, x, y)

    tangent = {n: direction[n].to(v.dtype) for n, v in point["params"].items()}
    with torch.enable_grad():
        values, proj = torch.func.jvp(losses, (point["params"],), (tangent,))
    return values.detach(), proj.detach()
