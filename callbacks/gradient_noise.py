"""Gradient noise scale ``B_simple = tr(Sigma) / |G|^2`` (McCandlish et al. 2018).

``G`` is the full-data gradient and ``Sigma`` the covariance of per-example gradients. B_simple is
the batch size at which the gradient noise is as large as the signal: batches much smaller than
it are noise-dominated, much larger ones waste compute. It is measured at the current parameters,
so it is a property of where training has got to, whatever regime (full or mini batch) got it
there.

Estimators (both unbiased for numerator and denominator separately, not for their ratio):

* :func:`b_simple_from_batch_grads` - ``k`` gradients ``g_i`` of disjoint batches of size ``B``.
  With i.i.d. sampling ``E|g_i - G|^2 = tr(Sigma)/B``, so ``tr(Sigma) ~ B * S`` with ``S`` the sample
  variance ``sum|g_i - mean g|^2 / (k-1)`` and ``|G|^2 ~ |mean g|^2 - S/k``. Given the training set
  size ``N``, the exact finite-population (without replacement) versions are used instead.
* :func:`b_simple_two_batch` - McCandlish's Appendix A estimator from squared gradient norms
  measured at a small and a large batch size (e.g. running averages over training steps):
  ``|G|^2 ~ (B_big|G_big|^2 - B_small|G_small|^2)/(B_big - B_small)`` and
  ``tr(Sigma) ~ (|G_small|^2 - |G_big|^2)/(1/B_small - 1/B_big)``. When the big batch is the union
  of the small ones it coincides with the first estimator.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from shiftlab.callbacks.probe import Probe
from shiftlab.callbacks.probe_utils import check_positive_int, eval_mode, probe_model, train_split, trainable_params

__all__ = [
    "NoiseScale",
    "b_simple_from_batch_grads",
    "b_simple_two_batch",
    "b_simple_from_moments",
    "per_batch_gradients",
    "gradient_noise_scale",
    "GradientNoiseScale",
]


@dataclass
class NoiseScale:
    """Estimated ``tr(Sigma)``, ``|G|^2`` and their ratio ``b_simple`` (NaN if ``|G|^2 <= 0``)."""

    b_simple: float
    tr_sigma: float
    grad_sq: float

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def _ratio(tr_sigma: float, grad_sq: float) -> NoiseScale:
    b = tr_sigma / grad_sq if grad_sq > 0 else float("nan")
    return NoiseScale(b_simple=float(b), tr_sigma=float(tr_sigma), grad_sq=float(grad_sq))


def b_simple_from_batch_grads(
    grads: Tensor, batch_size: int, population_size: int | None = None
) -> NoiseScale:
    """B_simple from ``grads`` of shape ``(k, P)``: the mean-loss gradients of ``k >= 2`` batches.

    ``population_size=None`` assumes i.i.d. batches (sampling with replacement, or ``N >> kB``).
    With ``population_size=N`` the batches are taken to be disjoint, drawn without replacement from
    the ``N`` training examples (one random permutation), and the exact finite-population
    corrections are applied; ``tr(Sigma)`` is then the population covariance (divisor ``N``) and
    ``|G|^2`` is exact when ``k * B == N``.
    """
    if grads.dim() != 2 or grads.shape[0] < 2:
        raise ValueError(f"grads must have shape (k>=2, P), got {tuple(grads.shape)}")
    check_positive_int("batch_size", batch_size)
    g = grads.double()
    k = g.shape[0]
    mean = g.mean(0)
    s = float(((g - mean) ** 2).sum() / (k - 1))  # sample variance of batch gradients (trace)
    mean_sq = float((mean**2).sum())
    return b_simple_from_moments(s, mean_sq, k, batch_size, population_size)


def b_simple_from_moments(
    s: float, mean_sq: float, k: int, batch_size: int, population_size: int | None = None
) -> NoiseScale:
    """The estimator of :func:`b_simple_from_batch_grads` from its two moments: ``s`` the sample
    variance (trace) of the ``k`` batch gradients and ``mean_sq`` the squared norm of their mean.
    (Callers that already hold these, e.g. the per-example gradient tests, skip a copy of G.)"""
    if population_size is None:
        tr_sigma = s * batch_size
        grad_sq = mean_sq - s / k
    else:
        n = population_size
        if k * batch_size > n:
            raise ValueError(
                f"population_size={n} is smaller than num_batches*batch_size={k * batch_size}"
            )
        # Disjoint batches of one permutation: E[S] = tr(Sigma) * N / ((N-1) B).
        tr_sigma = s * batch_size * (n - 1) / n
        m = k * batch_size
        grad_sq = mean_sq - tr_sigma / m * (n - m) / (n - 1) if n > 1 else mean_sq
    return _ratio(tr_sigma, grad_sq)


def b_simple_two_batch(
    g_small_sq: float, g_big_sq: float, b_small: int, b_big: int
) -> NoiseScale:
    """McCandlish et al. (2018, App. A) from ``E|G_B|^2 = |G|^2 + tr(Sigma)/B`` at two sizes."""
    if not 0 < b_small < b_big:
        raise ValueError(f"need 0 < b_small < b_big, got b_small={b_small}, b_big={b_big}")
    grad_sq = (b_big * g_big_sq - b_small * g_small_sq) / (b_big - b_small)
    tr_sigma = (g_small_sq - g_big_sq) / (1.0 / b_small - 1.0 / b_big)
    return _ratio(tr_sigma, grad_sq)


def per_batch_gradients(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    batch_size: int,
    num_batches: int,
    loss: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Flattened mean-loss gradients ``(num_batches, P)`` of disjoint random batches of ``(x, y)``.

    Uses ``torch.autograd.grad`` so ``p.grad`` is left untouched; the caller chooses the mode
    (train/eval) of ``model``.
    """
    check_positive_int("batch_size", batch_size)
    check_positive_int("num_batches", num_batches)
    n = x.shape[0]
    if num_batches * batch_size > n:
        raise ValueError(
            f"num_batches*batch_size={num_batches * batch_size} exceeds the {n} samples available"
        )
    params = trainable_params(model)
    perm = torch.randperm(n, generator=generator)
    device = next(iter(params)).device
    rows = []
    for i in range(num_batches):
        idx = perm[i * batch_size : (i + 1) * batch_size]
        xb, yb = x[idx].to(device), y[idx].to(device)
        with torch.enable_grad():
            value = loss(model(xb), yb)
            gs = torch.autograd.grad(value, params, allow_unused=True)
        rows.append(torch.cat([
            (torch.zeros_like(p) if g is None else g).reshape(-1) for g, p in zip(gs, params)
        ]))
    return torch.stack(rows)


def gradient_noise_scale(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    batch_size: int = 32,
    num_batches: int = 16,
    loss: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy,
    generator: torch.Generator | None = None,
    finite_population: bool = True,
) -> NoiseScale:
    """B_simple of ``loss`` on ``(x, y)`` at the model's current parameters (model in eval mode)."""
    with eval_mode(model):
        grads = per_batch_gradients(model, x, y, batch_size, num_batches, loss, generator)
    return b_simple_from_batch_grads(
        grads, batch_size, population_size=x.shape[0] if finite_population else None
    )


class GradientNoiseScale(Probe):
    """Log ``noise/b_simple``, ``noise/tr_sigma`` and ``noise/grad_sq`` every few epochs.

    Args:
        every_n_epochs: probe after every ``every_n_epochs``-th training epoch and after the last.
        batch_size: size ``B`` of each probe batch (the "small" batch).
        num_batches: number ``k >= 2`` of disjoint probe batches (cost: ``k`` forward+backward
            passes on ``B`` samples, no optimizer step, ``.grad`` untouched).
        labels: ``"given"`` (the possibly noisy training labels the model is trained on) or
            ``"true"`` (the clean ones, ``train_set.y_true``).
        seed: seed of the batch sampler; the draw for epoch ``e`` uses ``seed + e``, so every rank
            computes the same number.

    The model is probed in eval mode with cross-entropy on the training split. Scheduling, cost,
    summary and resume: :class:`~shiftlab.callbacks.probe.Probe`.
    """

    name = "noise_scale"

    def __init__(self, every_n_epochs: int = 1, batch_size: int = 32, num_batches: int = 16,
                 labels: str = "given", seed: int = 0) -> None:
        super().__init__(every_n_epochs=check_positive_int("every_n_epochs", every_n_epochs), log_prefix="noise")
        self.batch_size = check_positive_int("batch_size", batch_size)
        if num_batches < 2:
            raise ValueError(f"num_batches must be an integer >= 2, got {num_batches!r}")
        self.num_batches = num_batches
        if labels not in ("given", "true"):
            raise ValueError(f"labels={labels!r} is unknown; allowed: given, true")
        self.labels = labels
        self.seed = seed

    def measure(self, trainer: Any, pl_module: Any, batch: Any = None) -> dict[str, float]:
        split = train_split(trainer)
        y = split.y if self.labels == "given" else split.y_true
        n = split.x.shape[0]
        k = min(self.num_batches, n // self.batch_size)
        if k < 2:
            raise ValueError(f"batch_size={self.batch_size} leaves fewer than 2 batches in {n} training samples")
        gen = torch.Generator().manual_seed(self.seed + trainer.current_epoch)
        return gradient_noise_scale(probe_model(pl_module), split.x, y, self.batch_size, k, generator=gen).as_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if "last" in state_dict:  # checkpoints from before the Probe base kept the last values only
            last = dict(state_dict["last"])
            state_dict = {"history": [{"step": -1, **last}] if last else []}
        super().load_state_dict(state_dict)
