"""Exact full-batch gradients, accumulated in chunks, plus Geiping et al.'s full-batch fixes.

Why chunks: the whole training set rarely fits through the model at once. Each chunk contributes
``sum(per-sample loss) / n_total`` to the objective, so the accumulated gradient equals the
gradient of the mean loss over all samples whatever the chunking (an uneven last chunk included).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def as_model_input(model: nn.Module, x: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """``x`` on ``device`` in the dtype of ``model``'s floating parameters when ``x`` is floating.

    Why: Lightning converts the batches it hands to ``training_step`` for ``precision=64-true``
    (the model is float64), but tensors read straight from the data module stay float32; integer
    inputs (symbol ids) are left alone.
    """
    if x.is_floating_point():
        dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), x.dtype)
        return x.to(device, dtype=dtype, non_blocking=True)
    return x.to(device, non_blocking=True)


def per_sample_cross_entropy(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, y, reduction="none")


def accumulate_full_gradient(model: nn.Module, x: torch.Tensor, y: torch.Tensor, chunk_size: int,
                             n_total: int, device: torch.device | str,
                             loss_fn: LossFn = per_sample_cross_entropy,
                             on_chunk: Callable[[torch.Tensor, torch.Tensor], None] | None = None
                             ) -> torch.Tensor:
    """Add d/dθ [sum of per-sample losses over ``x`` / n_total] into ``p.grad``.

    Returns the (detached) partial mean loss ``sum(loss) / n_total`` for these samples.
    ``on_chunk(logits, y)`` lets the caller update metrics from the same forward pass.
    """
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    total = torch.zeros((), device=device, dtype=dtype)  # float64 under precision=64-true
    for start in range(0, x.shape[0], chunk_size):
        xb = as_model_input(model, x[start:start + chunk_size], device)
        yb = y[start:start + chunk_size].to(device, non_blocking=True)
        logits = model(xb)
        loss = loss_fn(logits, yb).sum() / n_total
        loss.backward()
        total += loss.detach()
        if on_chunk is not None:
            on_chunk(logits.detach(), yb)
    return total


def all_reduce_gradients(params: list[torch.Tensor]) -> None:
    """Sum gradients over ranks (each rank already divided by the global sample count)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def grad_norm_penalty_fd(params: list[torch.Tensor], recompute_grad: Callable[[], None], alpha: float,
                         eps: float = 0.01, buffers: list[torch.Tensor] | None = None) -> float:
    """Add the gradient of ``(alpha / 2) * ||grad L||^2`` to ``p.grad`` by a finite difference.

    That gradient is ``alpha * H g`` with ``g = grad L``; ``H g`` is approximated as
    ``(grad L(θ + h g) - g) / h`` with ``h = eps / ||g||`` (Geiping et al. 2022), which costs one
    extra gradient evaluation instead of double backpropagation. ``recompute_grad`` must zero the
    gradients and refill ``p.grad`` with grad L at the current parameters. Buffers (e.g. BN
    running statistics) touched by the extra pass are restored. Returns ``||g||``.
    """
    g = [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for p in params]
    gnorm = torch.sqrt(sum((gi.double() ** 2).sum() for gi in g)).item()
    if alpha == 0 or gnorm == 0.0:
        return gnorm
    h = eps / gnorm
    saved_buffers = [b.detach().clone() for b in buffers] if buffers else []
    saved_params = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p, gi in zip(params, g):
            p.add_(gi, alpha=h)
    recompute_grad()
    with torch.no_grad():
        for p, gi, p0 in zip(params, g, saved_params):
            p.copy_(p0)
            hg = (p.grad - gi) / h if p.grad is not None else torch.zeros_like(gi)
            p.grad = gi + alpha * hg
        for b, saved in zip(buffers or [], saved_buffers):
            b.copy_(saved)
    return gnorm
