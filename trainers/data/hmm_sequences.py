"""Symbol sequences sampled offline from a known hidden Markov model (``data=hmm_sequences``).

Why keep the true model: with the generating parameters at hand, the best achievable answer is
known exactly — posterior-marginal decoding with the true parameters is the Bayes-optimal
per-position decoder, and the true ``log p(x)`` is the ceiling for any fitted likelihood — so every
run can report its gap to the optimum.

Tensors: ``x`` (N, T) long symbols and ``y`` (N, T) long hidden states, both ``PAD`` (-100) after
each sequence's length; batches stay ``(x, y)`` and the mask is ``x >= 0``. Lengths are kept in
each split's ``extras["lengths"]``. Label noise (``data.label_noise``) is symmetric and applied per
*token* to the training split's hidden-state labels (``corrupted`` is then (N, T)).
"""
from __future__ import annotations

import torch

from shiftlab.trainers.data.base import TensorDataModule, TensorSplit
from shiftlab.trainers.data.label_noise import corrupt_labels
from shiftlab.trainers.models.hmm import HMMParams, make_hmm


def sample_hmm_dataset(num_sequences: int, length: int, min_length: int | None, num_states: int,
                       num_symbols: int, stickiness: float, emission_noise: float, seed: int
                       ) -> tuple[HMMParams, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Make a random HMM (seeded) and draw ``num_sequences`` from it: ``(params, x, z, lengths)``."""
    if num_sequences < 1:
        raise ValueError(f"data.num_sequences={num_sequences} must be >= 1")
    params = make_hmm(num_states, num_symbols, stickiness, emission_noise, seed)
    x, z, lengths = params.sample(num_sequences, length, min_length, seed=seed + 1)
    return params, x, z, lengths


def corrupt_tokens(y: torch.Tensor, rate: float, num_classes: int, seed: int
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric label noise over the valid tokens of (N, T) labels (padding untouched)."""
    valid = y >= 0
    noisy_flat, changed_flat = corrupt_labels(y[valid], rate, num_classes, seed)
    noisy, changed = y.clone(), torch.zeros_like(valid)
    noisy[valid], changed[valid] = noisy_flat, changed_flat
    return noisy, changed


class HMMSequenceDataModule(TensorDataModule):
    """Args (besides the base's):
        num_sequences: pool size before the train/val/test split.
        length / min_length: lengths are uniform in ``[min_length, length]`` (padding masked).
        num_states / num_symbols: K hidden states, V observed symbols.
        stickiness: weight of "stay" in each transition row (0 <= s < 1).
        emission_noise: 0 = states almost readable from one symbol, 1 = random emissions.
        hmm_seed: seeds the true model and the sampled sequences (the run ``seed`` still seeds
            the split and the label noise), so runs with different seeds share one problem.
    """

    name = "hmm_sequences"

    def __init__(self, num_sequences: int = 2000, length: int = 32, min_length: int | None = 16,
                 num_states: int = 4, num_symbols: int = 12, stickiness: float = 0.8,
                 emission_noise: float = 0.5, hmm_seed: int = 0, **kwargs) -> None:
        kwargs.setdefault("standardize", False)
        super().__init__(**kwargs)
        self.num_sequences, self.length = int(num_sequences), int(length)
        self.min_length = None if min_length is None else int(min_length)
        self.num_states, self.num_symbols = int(num_states), int(num_symbols)
        self.stickiness, self.emission_noise = float(stickiness), float(emission_noise)
        self.hmm_seed = int(hmm_seed)
        self.true_params: HMMParams = make_hmm(self.num_states, self.num_symbols, self.stickiness,
                                               self.emission_noise, self.hmm_seed)

    def load(self) -> tuple:
        params, x, z, _ = sample_hmm_dataset(self.num_sequences, self.length, self.min_length,
                                             self.num_states, self.num_symbols, self.stickiness,
                                             self.emission_noise, self.hmm_seed)
        self.true_params = params
        self.num_classes = self.num_states
        return x, z

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        rate, self.label_noise = self.label_noise, 0.0  # the base corrupts whole rows; we do tokens
        try:
            super().setup(stage)
        finally:
            self.label_noise = rate
        tr = self.train_set
        noisy, changed = corrupt_tokens(tr.y_true, rate, self.num_classes, self.seed + 1)
        self.train_set = TensorSplit(tr.x, noisy, y_true=tr.y_true, corrupted=changed)
        for split in (self.train_set, self.val_set, self.test_set):
            split.extras["lengths"] = (split.x >= 0).sum(1)

    def describe(self) -> dict:
        d = super().describe()
        d.update(num_symbols=self.num_symbols, length=self.length, min_length=self.min_length,
                 stickiness=self.stickiness, emission_noise=self.emission_noise,
                 hmm_seed=self.hmm_seed, corrupted_tokens=d.pop("corrupted"))
        return d
