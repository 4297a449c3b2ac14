"""Hungarian matching of learned to true hidden states.

Why: an unsupervised HMM's states are identifiable only up to a permutation, so decoding
accuracy is scored after relabelling learned states by the assignment that maximizes agreement
with the true states (``scipy.optimize.linear_sum_assignment``).
"""
from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor


def confusion(pred: Tensor, target: Tensor, num_classes: int, mask: Tensor | None = None) -> Tensor:
    """``C[i, j]`` = number of valid positions with ``pred == i`` and ``target == j``."""
    valid = (target >= 0) & (pred >= 0)
    if mask is not None:
        valid &= mask
    idx = pred[valid] * num_classes + target[valid]
    return torch.bincount(idx, minlength=num_classes * num_classes).view(num_classes, num_classes)


def permutation_from_confusion(c: Tensor) -> Tensor:
    """``perm`` maximizing ``sum_k c[k, perm[k]]`` (rows: learned states, columns: true ones)."""
    rows, cols = linear_sum_assignment(c.double().cpu().numpy(), maximize=True)
    perm = np.empty(c.shape[0], dtype=np.int64)
    perm[rows] = cols
    return torch.from_numpy(perm)


def best_permutation(pred: Tensor, target: Tensor, num_classes: int, mask: Tensor | None = None) -> Tensor:
    """``perm`` with ``perm[learned_state] = true_state`` maximizing the number of matches."""
    return permutation_from_confusion(confusion(pred, target, num_classes, mask))


def apply_permutation(pred: Tensor, perm: Tensor) -> Tensor:
    """Relabel predicted states (padding, negative values, is kept)."""
    return torch.where(pred >= 0, perm[pred.clamp_min(0)], pred)


def permute_marginals(marginals: Tensor, perm: Tensor) -> Tensor:
    """Reorder the last axis so column ``perm[k]`` holds learned state ``k``."""
    out = torch.empty_like(marginals)
    out[..., perm] = marginals
    return out
