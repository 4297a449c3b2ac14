"""Helpers of the Triton BatchNorm tests: inputs in every layout and float64 torch twins.

Tolerances (max error relative to max(1, max |reference|)):
fp32 2e-5; fp16 4e-3 and bf16 3e-2 (one rounding of the output plus the rounded input).
"""
from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():  # CPU: run the Triton kernels in the interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first import of kernels

from torch import nn

from shiftlab.kernels import TritonBatchNorm1d, TritonBatchNorm2d

TOL = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2, torch.float64: 1e-10}
CUDA = torch.cuda.is_available()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1.0)).item()


def make_input(shape, layout: str, dtype=torch.float32, device="cpu", loc=0.5, scale=2.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * scale + loc)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    elif layout == "noncontig":  # every other position along the last dim of a wider tensor
        wide = torch.randn(*shape[:-1], 2 * shape[-1], generator=g, dtype=torch.float64) * scale + loc
        x = wide[..., ::2]
        assert not x.is_contiguous()
    return x.to(device=device, dtype=dtype)


def torch_twin(ours: nn.Module, dim: int) -> nn.Module:
    cls = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d}[dim]
    ref = cls(ours.num_features, ours.eps, ours.momentum, ours.affine, ours.track_running_stats)
    ref = ref.double()
    ref.load_state_dict({k: v.double() if v.is_floating_point() else v
                         for k, v in ours.state_dict().items()})
    ref.train(ours.training)
    return ref


def ours_for(shape, **kw) -> nn.Module:
    cls = TritonBatchNorm2d if len(shape) == 4 else TritonBatchNorm1d
    m = cls(shape[1], **kw)
    if m.affine:
        with torch.no_grad():
            g = torch.Generator().manual_seed(1)
            m.weight.copy_(torch.rand(shape[1], generator=g) + 0.5)
            m.bias.copy_(torch.rand(shape[1], generator=g) - 0.5)
    return m


def check_against_torch(x: torch.Tensor, ours: nn.Module, steps: int = 2, tol: float | None = None):
    """Forward, input/weight/bias gradients and running stats over ``steps`` steps."""
    tol = tol if tol is not None else TOL[x.dtype]
    ref = torch_twin(ours, x.dim()).to(x.device)
    ours.to(x.device)
    for step in range(steps):
        xo = (x + step * 0.25).detach().requires_grad_()
        xr = xo.detach().double().requires_grad_()
        yo, yr = ours(xo), ref(xr)
        assert yo.dtype == x.dtype and yo.shape == x.shape
        if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
            assert yo.is_contiguous(memory_format=torch.channels_last)
        assert rel_err(yo, yr) < tol, ("forward", step, rel_err(yo, yr))
        gy = torch.randn(yr.shape, generator=torch.Generator().manual_seed(step),
                         dtype=torch.float64).to(x.device)
        (yo * gy.to(yo)).sum().backward()
        (yr * gy).sum().backward()
        assert rel_err(xo.grad, xr.grad) < tol * 4, ("dx", step, rel_err(xo.grad, xr.grad))
        if ours.affine:
            assert rel_err(ours.weight.grad, ref.weight.grad) < tol * 4, "dweight"
            assert rel_err(ours.bias.grad, ref.bias.grad) < tol * 4, "dbias"
            ours.weight.grad = ours.bias.grad = ref.weight.grad = ref.bias.grad = None
        if ours.track_running_stats:
            assert rel_err(ours.running_mean, ref.running_mean) < tol, "running_mean"
            assert rel_err(ours.running_var, ref.running_var) < tol, "running_var"
            assert int(ours.num_batches_tracked) == int(ref.num_batches_tracked)
    return ours, ref
