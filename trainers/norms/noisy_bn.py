"""BatchNorm followed by non-stationary noise (Santurkar et al. 2018, Alg. 1).

Why: the paper's control for "BN works because it reduces internal covariate shift". The noise
re-introduces a distribution shift after every BN layer that changes at every step, yet the
network trains almost as well as with plain BN.

Per unit (channel) and training step: ``mu_t ~ U(-n_mu, n_mu)``, ``sigma_t ~ U(1, n_sigma)``.
Per sample and unit: ``m ~ U(mu_t - r_mu, mu_t + r_mu)``, ``s ~ N(sigma_t, r_sigma)``, and
``a <- s * a + m``. For convolutions every spatial position counts as a sample (a unit is a
channel), so ``m`` and ``s`` are drawn per element. Noise is drawn from torch's global RNG and
only in training mode; in eval mode the layer is exactly BatchNorm with running statistics.

``noise_position``: ``"after_affine"`` (default; the noise acts on the BN layer's output, i.e.
after ``gamma * x_hat + beta``, as Alg. 1 perturbs the activations a BN layer emits) or
``"before_affine"`` (on ``x_hat``, then the affine transform).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from shiftlab.trainers.norms import register_norm
from shiftlab.trainers.norms._bn_common import StatBatchNorm

POSITIONS = ("after_affine", "before_affine")


def noise_draws(shape: torch.Size, n_mu: float, n_sigma: float, r_mu: float, r_sigma: float,
                generator: torch.Generator | None = None, dtype: torch.dtype = torch.float32,
                device: torch.device | str = "cpu") -> tuple[Tensor, Tensor]:
    """The ``(s, m)`` of one step of Alg. 1 for an activation of ``shape`` ``(N, C, *)``.

    Why separate from applying them: a stacked member draws its plain run's ``(s, m)`` from its own
    generator outside ``vmap`` (``shiftlab.trainers.stacked.dropout``), in this order of draws."""
    kw = dict(device=device, dtype=dtype)
    per_channel = (1, shape[1]) + (1,) * (len(shape) - 2)
    mu_t = (torch.rand(shape[1], generator=generator, **kw) * 2 - 1) * n_mu
    sigma_t = 1 + torch.rand(shape[1], generator=generator, **kw) * (n_sigma - 1)
    m = mu_t.view(per_channel) + (torch.rand(shape, generator=generator, **kw) * 2 - 1) * r_mu
    s = sigma_t.view(per_channel) + torch.randn(shape, generator=generator, **kw) * r_sigma
    return s, m


def nonstationary_noise(a: Tensor, n_mu: float, n_sigma: float, r_mu: float, r_sigma: float,
                        generator: torch.Generator | None = None) -> Tensor:
    """Apply one step of Alg. 1's noise to ``a`` ``(N, C, *)``: ``s * a + m``."""
    s, m = noise_draws(a.shape, n_mu, n_sigma, r_mu, r_sigma, generator, a.dtype, a.device)
    return s * a + m


class NoisyBatchNorm(StatBatchNorm):
    """BatchNorm + non-stationary noise; ``nn.BatchNorm*d`` state_dict keys, in-layer DDP sync."""

    def __init__(self, num_features: int, n_mu: float = 0.5, n_sigma: float = 1.25,
                 r_mu: float = 0.1, r_sigma: float = 0.1, noise_position: str = "after_affine",
                 **bn_kwargs) -> None:
        super().__init__(num_features, **bn_kwargs)
        if noise_position not in POSITIONS:
            raise ValueError(f"norm.noise_position={noise_position!r} is invalid; allowed: {', '.join(POSITIONS)}")
        for key, val in (("n_mu", n_mu), ("r_mu", r_mu), ("r_sigma", r_sigma)):
            if val < 0:
                raise ValueError(f"norm.{key}={val} must be >= 0")
        if n_sigma < 1:
            raise ValueError(f"norm.n_sigma={n_sigma} must be >= 1 (sigma_t ~ U(1, n_sigma))")
        self.n_mu, self.n_sigma, self.r_mu, self.r_sigma = n_mu, n_sigma, r_mu, r_sigma
        self.noise_position = noise_position

    def extra_repr(self) -> str:
        return (super().extra_repr() + f", n_mu={self.n_mu}, n_sigma={self.n_sigma}, r_mu={self.r_mu}, "
                f"r_sigma={self.r_sigma}, noise_position={self.noise_position}")

    def _noise(self, a: Tensor) -> Tensor:
        return nonstationary_noise(a, self.n_mu, self.n_sigma, self.r_mu, self.r_sigma)

    def forward(self, x: Tensor) -> Tensor:
        self._check_input_dim(x)
        if not self.training:
            return self.normalize(x)
        if self.noise_position == "after_affine":
            return self._noise(self.normalize(x))
        return self.apply_affine(self._noise(self.normalize(x, affine=False)))


@register_norm("noisy_bn")
def build(num_features: int, dims: int, **kwargs) -> nn.Module:
    return NoisyBatchNorm(num_features, **kwargs)
