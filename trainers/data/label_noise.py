"""Symmetric label noise, seeded, with a record of which samples were corrupted.

Why a record: memorization studies (Zhang et al. 2017) report accuracy on the clean and on the
corrupted training samples separately, so the corruption mask must travel with the data.
"""
from __future__ import annotations

import numpy as np
import torch


def corrupt_labels(labels: torch.Tensor, rate: float, num_classes: int, seed: int
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(noisy_labels, corrupted_mask)``.

    Exactly ``round(rate * n)`` samples, chosen uniformly at random, get a label drawn uniformly
    from the *other* classes, so the realized corruption rate equals the requested one (up to
    rounding) and every corrupted label really differs from the true one.
    """
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"data.label_noise={rate} is out of range; allowed: 0 <= label_noise < 1")
    n = labels.shape[0]
    noisy = labels.clone()
    mask = torch.zeros(n, dtype=torch.bool)
    k = int(round(rate * n))
    if k == 0 or num_classes < 2:
        return noisy, mask
    rng = np.random.default_rng(seed)
    idx = torch.from_numpy(rng.choice(n, size=k, replace=False))
    shift = torch.from_numpy(rng.integers(1, num_classes, size=k))
    noisy[idx] = (labels[idx] + shift) % num_classes
    mask[idx] = True
    return noisy, mask
