"""``module=sequence``: chain models over symbol sequences (set by the ``model=hmm|crf|
position_softmax`` configs).

Why a task of its own: the loss of a structured model is not a function of per-position logits
(the HMM's is ``-log p(x)``, the CRF's ``-log p(y | x)``, both through the forward algorithm),
padding has to be masked, and an unsupervised model's accuracy is only defined after matching its
states to the true ones. Everything else (mini-batch and exact full-batch steps, clipping, the
gradient-norm penalty, logging, optimizers) is :class:`~shiftlab.trainers.modules.base.TaskModule`'s.

Every model is trained on the per-token negative log-likelihood ``-sum_b log p_b / #tokens``,
so mini-batch and full-batch runs minimize the same objective. A :class:`ChainReport` callback
(added through ``configure_callbacks``) puts the train-split figures and the Bayes ceilings in
``summary.json``; the test epoch scores the whole test split against the true model
(:func:`shiftlab.trainers.models.chain.metrics.evaluate`) and draws the reliability diagram.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import Tensor
from torchmetrics import Metric

from shiftlab.callbacks.reporting import Reporter
from shiftlab.trainers.models.chain import calibration, metrics
from shiftlab.trainers.models.chain.matching import confusion, permutation_from_confusion
from shiftlab.trainers.models.chain.metrics import ChainModel
from shiftlab.trainers.modules.base import TaskLoss, TaskModule


class MatchedAccuracy(Metric):
    """Per-token accuracy from a confusion matrix accumulated over an epoch; with
    ``match=True`` states are first relabelled by the best (Hungarian) matching, as an
    unsupervised model's states are only defined up to a permutation. Empty -> NaN."""

    full_state_update = False

    def __init__(self, num_classes: int, match: bool) -> None:
        super().__init__()
        self.num_classes, self.match = num_classes, match
        self.add_state("conf", default=torch.zeros(num_classes, num_classes, dtype=torch.long),
                       dist_reduce_fx="sum")

    def update(self, pred: Tensor, target: Tensor, mask: Tensor | None = None) -> None:
        self.conf += confusion(pred, target, self.num_classes, mask).to(self.conf.device)

    def compute(self) -> Tensor:
        c = self.conf.cpu()
        total = c.sum()
        if total == 0:
            return torch.tensor(float("nan"))
        if not self.match:
            return c.trace().double() / total
        perm = permutation_from_confusion(c)
        return c[torch.arange(self.num_classes), perm].sum().double() / total


class SequenceModule(TaskModule):
    """Trains a chain model (:class:`~shiftlab.trainers.models.chain.metrics.ChainModel`, declaring
    ``task = "sequence"``) on ``(x, y)`` batches of (B, T) symbols and hidden states, ``PAD`` after
    each length.

    Args (besides :class:`TaskModule`'s):
        num_bins: confidence bins of the ECE and the reliability diagram.
        track_train_acc: also decode each training batch to log ``train/acc`` (one extra
            forward-backward per batch; switch off for wall-time measurements).
    """

    task = "sequence"
    summary_metrics: tuple[str, ...] = (
        "train/loss", "train/acc", "train/ll_per_token", "train/seq_acc", "train/acc_vs_true_labels",
        *(f"val/{k}" for k in ("seq_acc", "ll_per_token", "bayes_acc", "bayes_seq_acc", "true_ll_per_token",
                                "gap_to_bayes_acc", "ece")),
        *(f"test/{k}" for k in ("loss", "acc", "seq_acc", "ll_per_token", "ece", "bayes_acc", "gap_to_bayes_acc")))

    def __init__(self, *args, num_bins: int = 15, track_train_acc: bool = True, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.num_bins = int(num_bins)
        self.track_train_acc = bool(track_train_acc)
        self.reliability: dict[str, Any] = {}

    @property
    def chain_model(self) -> ChainModel:
        return self.model  # type: ignore[return-value]

    # ------------------------------------------------------------------ the task's contract
    def loss(self, x: Tensor, y: Tensor, total: int | None = None) -> TaskLoss:
        """Per-token NLL ``-sum_b log p_b / #tokens``: ``p(x)`` for the HMM, ``p(y | x)`` for the
        supervised taggers; ``total`` (full batch) is the token count of the whole split."""
        mask = x >= 0
        n_tok = mask.sum()
        nll = -self.chain_model.log_likelihood(x, mask, y).sum()
        return TaskLoss(nll / (n_tok if total is None else total), n_tok)

    def eval_loss(self, x: Tensor, y: Tensor) -> TaskLoss:
        return self.loss(x, y)

    def count_units(self, x: Tensor) -> int:
        return int((x >= 0).sum())

    def make_accuracy(self, train: bool) -> Metric:
        return MatchedAccuracy(self.num_classes, match=not getattr(self.model, "supervised", True))

    @torch.no_grad()
    def update_accuracy(self, metric: Metric, x: Tensor, y: Tensor, output: Any) -> None:
        mask = x >= 0
        metric.update(self.chain_model.log_marginals(x, mask).argmax(-1), y, mask)

    def finish_test(self) -> dict[str, Any]:
        dm = self.trainer.datamodule
        scores, curves = self.evaluate_split(dm.test_set.x, dm.test_set.y)
        for k in ("acc", "seq_acc", "ll_per_token", "ece", "bayes_acc", "gap_to_bayes_acc"):
            if k in scores:
                self.log(f"test/{k}", scores[k])
        pred_perm = scores.pop("_confusion")
        self.reliability = {k: {n: v.tolist() for n, v in r.items()} for k, r in curves.items()}
        if self.trainer.is_global_zero:
            out = Path(self.trainer.default_root_dir) / "plots"
            calibration.plot_reliability(curves, out / "reliability.png",
                                         title=f"{type(self.model).__name__}: test ECE {scores['ece']:.3f}")
            (out / "reliability.json").write_text(json.dumps(self.reliability))
        return dict(scores, confusion_matrix=pred_perm)

    @torch.no_grad()
    def evaluate_split(self, x: Tensor, y: Tensor) -> tuple[dict[str, Any], dict]:
        """Full scores on (x, y) against the data module's true model; an unsupervised model's
        states are matched to the true ones on the *validation* split first."""
        was = self.model.training
        self.model.eval()
        dm = self.trainer.datamodule
        x, y = x.to(self.device), y.to(self.device)
        perm = None
        if not self.chain_model.supervised:
            perm = metrics.fit_permutation(self.chain_model, dm.val_set.x.to(self.device),
                                           dm.val_set.y.to(self.device))
        scores, curves = metrics.evaluate(self.chain_model, x, y, getattr(dm, "true_params", None), perm,
                                          self.num_bins)
        pred = metrics.predict(self.chain_model, x)["log_marginals"].argmax(-1)
        if perm is not None:
            pred = perm[pred]
        # confusion as (true, predicted), the spine's plot convention
        scores["_confusion"] = confusion(y, pred, self.num_classes, x >= 0).tolist()
        self.model.train(was)
        return scores, curves

    def configure_callbacks(self):
        # the same instance for fit and test: Lightning calls this hook at each entry point
        if not hasattr(self, "_report"):
            self._report = ChainReport()
        if any(cb is self._report for cb in self.trainer.callbacks):
            return []
        return [self._report]


class ChainReport(L.Callback, Reporter):
    """Adds the chain-model figures the generic summary cannot compute to ``summary.json``:
    train-split per-token log-likelihood and accuracy (vs the given and, with label noise, the
    true labels), and the true model's values on the validation split (the ceilings)."""

    def __init__(self) -> None:
        self.items: dict[str, Any] = {}

    @torch.no_grad()
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not isinstance(pl_module, SequenceModule):
            return
        dm = trainer.datamodule
        model = pl_module.chain_model
        was = pl_module.model.training
        pl_module.model.eval()
        tr, va = dm.train_set, dm.val_set
        dev = pl_module.device
        perm = None if model.supervised else metrics.fit_permutation(model, va.x.to(dev), va.y.to(dev))
        given, _ = metrics.evaluate(model, tr.x.to(dev), tr.y.to(dev), None, perm, pl_module.num_bins)
        items = {"train/loss": -given["ll_per_token"], "train/acc": given["acc"],
                 "train/ll_per_token": given["ll_per_token"], "train/seq_acc": given["seq_acc"]}
        if tr.corrupted is not None and bool(tr.corrupted.any()):
            clean, _ = metrics.evaluate(model, tr.x.to(dev), tr.y_true.to(dev), None, perm, pl_module.num_bins)
            items["train/acc_vs_true_labels"] = clean["acc"]
        true_params = getattr(dm, "true_params", None)
        if true_params is not None:
            v, _ = metrics.evaluate(model, va.x.to(dev), va.y.to(dev), true_params, perm, pl_module.num_bins)
            items.update({f"val/{k}": v[k] for k in ("acc", "seq_acc", "ll_per_token", "bayes_acc",
                                                      "bayes_seq_acc", "true_ll_per_token", "gap_to_bayes_acc",
                                                      "ece")})
            items["true_model"] = {"num_states": true_params.num_states, "num_symbols": true_params.num_symbols}
        items["model_kind"] = "unsupervised (states matched by Hungarian on val)" if perm is not None \
            else "supervised"
        pl_module.model.train(was)
        self.items = items

    def summary_items(self) -> dict[str, Any]:
        return dict(self.items)

    def state_dict(self) -> dict[str, Any]:
        return {"items": dict(self.items)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.items = dict(state_dict.get("items", {}))
