"""Ghost Batch Normalization (Hoffer, Hubara & Soudry 2017).

Why: large-batch training generalizes worse partly because BN statistics over a large batch are
less noisy; computing them over *virtual* sub-batches of ``virtual_batch_size`` samples restores
the small-batch noise inside a large batch.

Vectorized: samples ``i`` belong to chunk ``i // virtual_batch_size`` and per-chunk sums are
taken with one ``index_add`` (no Python loop over chunks); the variance is two-pass (around each
chunk's mean). A last chunk that would hold a single value per channel is merged into the
previous one (its variance would be undefined). Statistics are local to each process, as in the
paper: virtual batches never span ranks, so this layer does not sync across DDP ranks.

Running statistics are consistent with the chunk count: a forward with ``K`` chunks performs the
``K`` running-average updates that ``K`` separate BatchNorm forwards on the chunks would
(closed form, in chunk order) and advances ``num_batches_tracked`` by ``K``. With one chunk
(``virtual_batch_size >= batch``) the layer is exactly BatchNorm. Eval mode uses running stats.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from shiftlab.trainers.norms import register_norm
from shiftlab.trainers.norms._bn_common import StatBatchNorm


def chunk_ids(n: int, virtual_batch_size: int, spatial: int, device) -> Tensor:
    """Chunk index per sample; a trailing chunk with one value per channel joins its predecessor."""
    ids = torch.arange(n, device=device) // virtual_batch_size
    if n > virtual_batch_size and n % virtual_batch_size == 1 and spatial == 1:
        ids[-1] = ids[-2]
    return ids


def ghost_moments(x: Tensor, virtual_batch_size: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per-chunk mean ``(K, C)``, biased var ``(K, C)``, counts ``(K,)`` and chunk id per sample."""
    n, c = x.shape[0], x.shape[1]
    spatial = x[0, 0].numel() if x.dim() > 2 else 1
    ids = chunk_ids(n, virtual_batch_size, spatial, x.device)
    k = int(ids[-1]) + 1
    work = x if x.dtype in (torch.float32, torch.float64) else x.float()
    flat = work.reshape(n, c, -1)
    counts = torch.zeros(k, dtype=work.dtype, device=x.device).index_add_(
        0, ids, torch.full((n,), float(spatial), dtype=work.dtype, device=x.device))
    sums = torch.zeros(k, c, dtype=work.dtype, device=x.device).index_add(0, ids, flat.sum(-1))
    mean = sums / counts[:, None]
    dev = flat - mean[ids][..., None]
    var = torch.zeros(k, c, dtype=work.dtype, device=x.device).index_add(0, ids, (dev * dev).sum(-1)) / counts[:, None]
    return mean, var, counts, ids


class GhostBatchNorm(StatBatchNorm):
    """BN with statistics per virtual batch; ``nn.BatchNorm*d`` state_dict keys."""

    def __init__(self, num_features: int, virtual_batch_size: int = 32, **bn_kwargs) -> None:
        bn_kwargs.pop("sync", None)
        super().__init__(num_features, sync=False, **bn_kwargs)
        if int(virtual_batch_size) < 1:
            raise ValueError(f"norm.virtual_batch_size={virtual_batch_size} must be >= 1")
        self.virtual_batch_size = int(virtual_batch_size)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", virtual_batch_size={self.virtual_batch_size}"

    @torch.no_grad()
    def _update_running_chunks(self, mean: Tensor, var: Tensor, counts: Tensor) -> None:
        k = mean.shape[0]
        if (counts <= 1).any():
            raise ValueError("ghost_bn: expected more than 1 value per channel in every virtual batch when training")
        unbiased = var * (counts / (counts - 1))[:, None]
        if self.momentum is None:  # cumulative average over all chunks seen
            # a Python number: not under vmap, so the stacked launcher refuses momentum=None
            n0 = float(self.num_batches_tracked)
            w = torch.full((k,), 1.0 / (n0 + k), dtype=mean.dtype, device=mean.device)
            keep = n0 / (n0 + k)
        else:  # K successive EMA updates: r_K = (1-m)^K r_0 + m * sum_j (1-m)^(K-1-j) s_j
            m = float(self.momentum)
            expo = torch.arange(k - 1, -1, -1, dtype=mean.dtype, device=mean.device)
            w = m * (1 - m) ** expo
            keep = (1 - m) ** k
        self.num_batches_tracked.add_(k)
        self.running_mean.mul_(keep).add_((w[:, None] * mean).sum(0).to(self.running_mean.dtype))
        self.running_var.mul_(keep).add_((w[:, None] * unbiased).sum(0).to(self.running_var.dtype))

    def forward(self, x: Tensor) -> Tensor:
        self._check_input_dim(x)
        if not self.training:
            return self.normalize(x)
        mean, var, counts, ids = ghost_moments(x, self.virtual_batch_size)
        if self.track_running_stats:
            self._update_running_chunks(mean, var, counts)
        shape = (x.shape[0], x.shape[1]) + (1,) * (x.dim() - 2)
        inv = torch.rsqrt(var + self.eps)
        y = (x - mean[ids].view(shape).to(x.dtype)) * inv[ids].view(shape).to(x.dtype)
        return self.apply_affine(y)


@register_norm("ghost_bn")
def build(num_features: int, dims: int, **kwargs) -> nn.Module:
    return GhostBatchNorm(num_features, **kwargs)
