"""Scoring a chain model against the truth and against the Bayes-optimal ceiling.

``evaluate`` is a plain function on tensors (no Trainer) so the Lightning module, the
experiment script and the tests all report the same numbers.

Decoders: per-position accuracy uses the argmax of the posterior marginals (the decoder that
maximizes expected per-position accuracy, and the one that is Bayes-optimal with the true
parameters); sequence accuracy uses Viterbi (the decoder that maximizes the probability of the
whole sequence being right; its Bayes counterpart is Viterbi with the true parameters).
Log-likelihood per token is ``log p(x)`` for the unsupervised HMM and ``log p(y | x)`` for the
supervised taggers, each beside the true model's value of the same quantity.
"""
from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor

from shiftlab.trainers.models.chain import calibration
from shiftlab.trainers.models.hmm import HMMParams, true_model_scores
from shiftlab.trainers.models.chain.matching import apply_permutation, best_permutation, permute_marginals


class ChainModel(Protocol):
    supervised: bool
    task: str  # "sequence": the module that trains it
    num_states: int

    def loss(self, x: Tensor, y: Tensor, mask: Tensor) -> Tensor: ...
    def log_likelihood(self, x: Tensor, mask: Tensor | None = None, y: Tensor | None = None) -> Tensor: ...
    def log_marginals(self, x: Tensor, mask: Tensor | None = None) -> Tensor: ...
    def decode(self, x: Tensor, mask: Tensor | None = None) -> Tensor: ...


@torch.no_grad()
def predict(model: ChainModel, x: Tensor, chunk_size: int = 2048) -> dict[str, Tensor]:
    """Model outputs over a whole split, in chunks: log marginals, Viterbi path, log-likelihood
    (``log p(x)``; supervised models need labels, so theirs comes from :func:`evaluate`)."""
    outs: dict[str, list[Tensor]] = {"log_marginals": [], "viterbi": []}
    for lo in range(0, x.shape[0], chunk_size):
        xb = x[lo:lo + chunk_size]
        mb = xb >= 0
        outs["log_marginals"].append(model.log_marginals(xb, mb).float())
        outs["viterbi"].append(model.decode(xb, mb))
    return {k: torch.cat(v) for k, v in outs.items()}


@torch.no_grad()
def log_likelihood(model: ChainModel, x: Tensor, y: Tensor | None, chunk_size: int = 2048) -> Tensor:
    parts = []
    for lo in range(0, x.shape[0], chunk_size):
        xb = x[lo:lo + chunk_size]
        yb = None if y is None else y[lo:lo + chunk_size]
        parts.append(model.log_likelihood(xb, xb >= 0, yb).double())
    return torch.cat(parts)


def fit_permutation(model: ChainModel, x: Tensor, y: Tensor) -> Tensor:
    """Hungarian matching of the model's posterior-decoded states to the true ones on (x, y)."""
    pred = predict(model, x)["log_marginals"].argmax(-1)
    return best_permutation(pred, y, model.num_states, x >= 0)


@torch.no_grad()
def evaluate(model: ChainModel, x: Tensor, y: Tensor, true_params: HMMParams | None = None,
             perm: Tensor | None = None, num_bins: int = 15) -> tuple[dict[str, float], dict]:
    """Scores of ``model`` on (x, y) (``y`` = true hidden states) and, given ``true_params``,
    the Bayes ceilings. Unsupervised models are scored after relabelling their states by
    ``perm`` (fitted on these data by Hungarian matching if not given; reported as
    ``matched_on_eval``). Returns ``(scalars, reliability_curves)``."""
    mask = x >= 0
    n_tok = float(mask.sum())
    out = predict(model, x)
    log_m, path = out["log_marginals"], out["viterbi"]
    res: dict[str, float] = {}
    if not model.supervised:
        if perm is None:
            perm = best_permutation(log_m.argmax(-1), y, model.num_states, mask)
            res["matched_on_eval"] = 1.0
        log_m, path = permute_marginals(log_m, perm), apply_permutation(path, perm)
    pred = log_m.argmax(-1)
    res["acc"] = float((pred == y)[mask].double().mean())
    res["viterbi_acc"] = float((path == y)[mask].double().mean())
    res["seq_acc"] = float(((path == y) | ~mask).all(1).double().mean())
    ll = log_likelihood(model, x, y if model.supervised else None)
    res["ll_per_token"] = float(ll.sum()) / n_tok
    probs, target = calibration.flatten_valid(log_m.exp(), y, mask)
    curves = {"model": calibration.reliability_bins(probs, target, num_bins)}
    res["ece"] = calibration.expected_calibration_error(probs, target, num_bins)
    if true_params is not None:
        t = true_model_scores(true_params, x, mask, y if model.supervised else None)
        bpred = t["log_marginals"].argmax(-1)
        res["bayes_acc"] = float((bpred == y)[mask].double().mean())
        res["bayes_seq_acc"] = float(((t["viterbi"] == y) | ~mask).all(1).double().mean())
        true_ll = t["log_py_given_x"] if model.supervised else t["log_px"]
        res["true_ll_per_token"] = float(true_ll.sum()) / n_tok
        res["gap_to_bayes_acc"] = res["bayes_acc"] - res["acc"]
        res["gap_to_true_ll_per_token"] = res["true_ll_per_token"] - res["ll_per_token"]
        bprobs, _ = calibration.flatten_valid(t["log_marginals"].exp().float(), y, mask)
        curves["true model (Bayes)"] = calibration.reliability_bins(bprobs, target, num_bins)
        res["bayes_ece"] = calibration.expected_calibration_error(bprobs, target, num_bins)
    return res, curves
