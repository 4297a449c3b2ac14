"""The dense Hessian of a model's mean cross-entropy, the reference the curvature estimates are tested against."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.func import functional_call


def dense_hessian(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Hessian of ``cross_entropy(model(x), y)`` over all parameters (flattened in order), with the
    model in whatever mode it is in (train mode: BatchNorm with batch statistics)."""
    names = [n for n, _ in model.named_parameters()]
    params = list(model.parameters())
    flat0 = torch.cat([p.detach().reshape(-1) for p in params])
    buffers = {n: b.clone() for n, b in model.named_buffers()}

    def f(flat):
        d, i = dict(buffers), 0
        for n, p in zip(names, params):
            d[n] = flat[i : i + p.numel()].view_as(p)
            i += p.numel()
        return F.cross_entropy(functional_call(model, d, (x,)), y)

    return torch.autograd.functional.hessian(f, flat0)
