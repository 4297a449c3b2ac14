"""Batch Renormalization (Ioffe 2017).

Why: BN's training output depends on the mini-batch, its inference output on running averages;
Batch Renorm corrects the batch statistics towards the running ones with
``r = sg(sigma_B / sigma)`` clipped to ``[1/r_max, r_max]`` and ``d = sg((mu_B - mu) / sigma)``
clipped to ``[-d_max, d_max]``: ``y = gamma * ((x - mu_B) / sigma_B * r + d) + beta``. That keeps
small or non-i.i.d. batches usable. With ``r_max = 1, d_max = 0`` it is exactly BatchNorm.

Warm-up (the paper's schedule): ``r_max = 1, d_max = 0`` for the first ``warmup_steps`` training
steps, then linear relaxation to ``r_max`` by ``r_max_steps`` and to ``d_max`` by
``d_max_steps`` (paper: 5k, 40k, 25k with r_max=3, d_max=5).

The global step is the layer's ``num_batches_tracked`` buffer, i.e. the number of *training
forwards* the layer has seen (one per optimizer step without gradient accumulation; with k
accumulation micro-batches divide the step counts by k yourself). Reusing torch's buffer keeps the
state_dict keys of ``nn.BatchNorm*d`` exactly (strict loading works both ways) and makes the
schedule resume from checkpoints. It therefore requires ``track_running_stats=True``.

Running statistics: torch's convention (EMA of the mean and of the unbiased batch variance,
``sigma = sqrt(running_var + eps)``), so eval mode matches ``nn.BatchNorm*d`` exactly.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from shiftlab.trainers.norms import register_norm
from shiftlab.trainers.norms._bn_common import StatBatchNorm, channel_view


def renorm_limits(step: int, r_max: float, d_max: float, warmup_steps: int,
                  r_max_steps: int, d_max_steps: int) -> tuple[float, float]:
    """(r_max, d_max) in force at training step ``step`` (1-based count of training forwards)."""
    def ramp(final: float, start_val: float, end: int) -> float:
        if step <= warmup_steps:
            return start_val
        if end <= warmup_steps or step >= end:
            return final
        frac = (step - warmup_steps) / (end - warmup_steps)
        return start_val + frac * (final - start_val)

    return ramp(r_max, 1.0, r_max_steps), ramp(d_max, 0.0, d_max_steps)


def renorm_limits_tensor(step: Tensor, r_max: float, d_max: float, warmup_steps: int,
                         r_max_steps: int, d_max_steps: int) -> tuple[Tensor, Tensor]:
    """:func:`renorm_limits` of a step count held in a tensor (float64, same numbers).

    Why: the layer reads its step from ``num_batches_tracked``; as a tensor it never becomes a Python
    number, so the schedule also works under ``vmap`` (a stacked group's per-member step counts)."""
    t = step.to(torch.float64)

    def ramp(final: float, start_val: float, end: int) -> Tensor:
        start, fin = torch.full_like(t, start_val), torch.full_like(t, final)
        if end <= warmup_steps:
            return torch.where(t <= warmup_steps, start, fin)
        frac = (t - warmup_steps) / (end - warmup_steps)
        mid = start_val + frac * (final - start_val)
        return torch.where(t <= warmup_steps, start, torch.where(t >= end, fin, mid))

    return ramp(r_max, 1.0, r_max_steps), ramp(d_max, 0.0, d_max_steps)


def renorm_corrections(mean: Tensor, std: Tensor, running_mean: Tensor, running_std: Tensor, r_lim: Tensor,
                       d_lim: Tensor) -> tuple[Tensor, Tensor]:
    """The clipped ``(r, d)`` of one training forward (no gradient flows through them)."""
    # bounds rounded to the working dtype from float64, as clamp rounds Python-number bounds
    r_lo, r_hi, d_hi = (1.0 / r_lim).to(std.dtype), r_lim.to(std.dtype), d_lim.to(mean.dtype)
    r = torch.clamp(std / running_std.to(std.dtype), r_lo, r_hi)
    d = torch.clamp((mean - running_mean.to(mean.dtype)) / running_std.to(mean.dtype), -d_hi, d_hi)
    return r, d


class BatchRenorm(StatBatchNorm):
    """Batch Renorm with ``nn.BatchNorm*d`` state_dict keys and in-layer DDP sync."""

    def __init__(self, num_features: int, r_max: float = 3.0, d_max: float = 5.0,
                 warmup_steps: int = 5000, r_max_steps: int = 40000, d_max_steps: int = 25000,
                 **bn_kwargs) -> None:
        if not bn_kwargs.get("track_running_stats", True):
            raise ValueError("norm.track_running_stats=False is not allowed for batch_renorm (it corrects towards running stats)")
        super().__init__(num_features, **bn_kwargs)
        if r_max < 1:
            raise ValueError(f"norm.r_max={r_max} must be >= 1")
        if d_max < 0:
            raise ValueError(f"norm.d_max={d_max} must be >= 0")
        self.r_max, self.d_max = r_max, d_max
        self.warmup_steps, self.r_max_steps, self.d_max_steps = warmup_steps, r_max_steps, d_max_steps

    def extra_repr(self) -> str:
        return (super().extra_repr() + f", r_max={self.r_max}, d_max={self.d_max}, warmup_steps={self.warmup_steps}, "
                f"r_max_steps={self.r_max_steps}, d_max_steps={self.d_max_steps}")

    def current_limits(self) -> tuple[Tensor, Tensor]:
        """(r_max, d_max) in force now, as float64 tensors (batched under a stacked group's ``vmap``)."""
        return renorm_limits_tensor(self.num_batches_tracked, self.r_max, self.d_max,
                                    self.warmup_steps, self.r_max_steps, self.d_max_steps)

    def forward(self, x: Tensor) -> Tensor:
        self._check_input_dim(x)
        if not self.training:
            return self.normalize(x)
        # Limits and the correction use the running stats *before* this step's update.
        running_mean = self.running_mean.detach().clone()
        running_std = torch.sqrt(self.running_var.detach() + self.eps)
        factor = self.momentum_factor()
        r_lim, d_lim = self.current_limits()
        mean, var, n = self.batch_moments(x)
        self.update_running(mean, var, n, factor)
        std = torch.sqrt(var + self.eps)
        with torch.no_grad():
            r, d = renorm_corrections(mean, std, running_mean, running_std, r_lim, d_lim)
        scale = r / std
        shift = d - mean * scale
        y = x * channel_view(scale, x).to(x.dtype) + channel_view(shift, x).to(x.dtype)
        return self.apply_affine(y)


@register_norm("batch_renorm")
def build(num_features: int, dims: int, **kwargs) -> nn.Module:
    return BatchRenorm(num_features, **kwargs)
