"""Batching regimes: what one optimizer step sees.

``MiniBatch``: the usual shuffled mini-batches, one step per batch.
``FullBatch``: exact full-batch gradient descent, one step per epoch from the gradient of the mean
loss over the whole training set, accumulated in chunks of ``chunk_size`` samples (deterministic
order). Optional Geiping et al. (2022) fixes: gradient clipping and a gradient-norm penalty
computed by finite differences.

With BatchNorm in the model, each chunk is normalized with its own statistics (ghost-batch
semantics), so the full-batch gradient then depends on ``chunk_size``.

Plain classes, not dataclasses: Hydra would turn a dataclass passed to ``instantiate`` into a
structured config.
"""
from __future__ import annotations


class MiniBatch:
    kind = "mini"

    def __init__(self, batch_size: int = 128) -> None:
        self.batch_size = int(batch_size)

    @property
    def loader_batch_size(self) -> int:
        return self.batch_size

    def __repr__(self) -> str:
        return f"MiniBatch(batch_size={self.batch_size})"


class FullBatch:
    kind = "full"

    def __init__(self, chunk_size: int = 4096, clip_grad_norm: float | None = None,
                 grad_norm_penalty: float = 0.0, grad_penalty_eps: float = 0.01) -> None:
        self.chunk_size = int(chunk_size)
        self.clip_grad_norm = clip_grad_norm
        self.grad_norm_penalty = float(grad_norm_penalty)
        self.grad_penalty_eps = float(grad_penalty_eps)

    @property
    def loader_batch_size(self) -> int:
        return self.chunk_size

    def __repr__(self) -> str:
        return (f"FullBatch(chunk_size={self.chunk_size}, clip_grad_norm={self.clip_grad_norm}, "
                f"grad_norm_penalty={self.grad_norm_penalty})")
