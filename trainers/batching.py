"""Batching regimes: what one optimizer step sees.

``MiniBatch``: the usual shuffled mini-batches, one step per batch.
``FullBatch``: exact full-batch gradient descent, one step per epoch from the gradient of the mean
loss over the whole training set, accumulated in chunks of ``chunk_size`` samples (deterministic
order). Optional Geiping et al. (2022) fixes: gradient clipping and a gradient-norm penalty
computed by finite differences.

With BatchNorm in the model, each chunk is normalized with its own statistics (ghost-batch
semantics), so the full-batch gradient then depends on ``chunk_size``.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class MiniBatch:
    batch_size: int = 128
    kind: str = "mini"

    @property
    def loader_batch_size(self) -> int:
        return self.batch_size


@dataclass
class FullBatch:
    chunk_size: int = 4096
    clip_grad_norm: float | None = None
    grad_norm_penalty: float = 0.0
    grad_penalty_eps: float = 0.01
    kind: str = "full"

    @property
    def loader_batch_size(self) -> int:
        return self.chunk_size
