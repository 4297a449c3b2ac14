"""LightningModule for chain models over symbol sequences (``module=sequence``; set by the
``model=hmm|crf|position_softmax`` configs' experiments).

Why not :class:`~shiftlab.trainers.module.ClassificationModule` as is: the loss of a structured model is
not a function of per-position logits (the HMM's is ``-log p(x)``, the CRF's ``-log p(y | x)``,
both through the forward algorithm), padding has to be masked, and an unsupervised model's
accuracy is only defined after matching its states to the true ones. Everything else — the
optimizer and scheduler factories, mini-batch vs exact full-batch steps (closure-based, so
L-BFGS works), gradient clipping and the gradient-norm penalty — is inherited unchanged.

Every model is trained on the per-token negative log-likelihood ``-sum_b log p_b / #tokens``,
so mini-batch and full-batch runs minimize the same objective. A :class:`ChainReport` callback
(added through ``configure_callbacks``) puts the train-split figures and the Bayes ceilings in
``summary.json``; the test epoch scores the whole test split against the true model
(:func:`shiftlab.trainers.pgm.metrics.evaluate`) and draws the reliability diagram.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import lightning as L
import torch
from torch import Tensor, nn
from torchmetrics import MeanMetric, Metric

from shiftlab.trainers.batching import FullBatch, MiniBatch
from shiftlab.trainers.full_batch import all_reduce_gradients
from shiftlab.trainers.module import ClassificationModule
from shiftlab.trainers.pgm import calibration, metrics
from shiftlab.trainers.pgm.matching import confusion, permutation_from_confusion
from shiftlab.trainers.pgm.metrics import ChainModel
from shiftlab.callbacks.reporting import Reporter


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


class SequenceModule(ClassificationModule):
    """Trains a chain model (:class:`~shiftlab.trainers.pgm.metrics.ChainModel`) on ``(x, y)`` batches of
    (B, T) symbols and hidden states, ``PAD`` after each length.

    Args (besides :class:`ClassificationModule`'s):
        num_bins: confidence bins of the ECE and the reliability diagram.
        track_train_acc: also decode each training batch to log ``train/acc`` (one extra
            forward-backward per batch; switch off for wall-time measurements).
    """

    summary_metrics: tuple[str, ...] = (
        "train/loss", "train/acc", "train/ll_per_token", "train/seq_acc", "train/acc_vs_true_labels",
        *(f"val/{k}" for k in ("seq_acc", "ll_per_token", "bayes_acc", "bayes_seq_acc", "true_ll_per_token",
                                "gap_to_bayes_acc", "ece")),
        *(f"test/{k}" for k in ("loss", "acc", "seq_acc", "ll_per_token", "ece", "bayes_acc", "gap_to_bayes_acc")))

    def __init__(self, model: nn.Module, optimizer: Callable, scheduler: Callable | None,
                 batching: MiniBatch | FullBatch, num_classes: int, num_bins: int = 15,
                 track_train_acc: bool = True) -> None:
        for attr in ("loss", "log_likelihood", "log_marginals", "decode"):
            if not callable(getattr(model, attr, None)):
                raise ValueError(f"module=sequence needs a chain model (model=hmm|crf|position_softmax); "
                                 f"{type(model).__name__} has no {attr}()")
        super().__init__(model, optimizer, scheduler, batching, num_classes)
        model.wrapped_by_sequence_module = True
        self.num_bins = int(num_bins)
        self.track_train_acc = bool(track_train_acc)
        match = not getattr(model, "supervised", True)
        self.train_acc = MatchedAccuracy(num_classes, match)
        self.val_acc = MatchedAccuracy(num_classes, match)
        self.val_ll = MeanMetric()
        self.reliability: dict[str, Any] = {}

    @property
    def chain_model(self) -> ChainModel:
        return self.model  # type: ignore[return-value]

    # ------------------------------------------------------------------ objective
    def _nll_sum(self, x: Tensor, y: Tensor, mask: Tensor) -> Tensor:
        """``-sum_b log p_b``: ``p(x)`` for the HMM, ``p(y | x)`` for supervised taggers."""
        return -self.chain_model.log_likelihood(x, mask, y).sum()

    @torch.no_grad()
    def _update_acc(self, metric: MatchedAccuracy, x: Tensor, y: Tensor, mask: Tensor) -> None:
        pred = self.chain_model.log_marginals(x, mask).argmax(-1)
        metric.update(pred, y, mask)

    def training_step(self, batch, batch_idx: int):
        if self.full_batch:
            return self._full_batch_step()
        x, y = batch
        mask = x >= 0
        n_tok = mask.sum()
        loss = self._nll_sum(x, y, mask) / n_tok
        self.last_loss = loss.detach()
        self.train_loss.update(loss.detach(), weight=n_tok)
        self.log("train/loss", self.train_loss, on_step=False, on_epoch=True, prog_bar=True)
        if self.track_train_acc:
            self._update_acc(self.train_acc, x, y, mask)
            self.log("train/acc", self.train_acc, on_step=False, on_epoch=True, prog_bar=True)
        return loss

    def _full_gradient(self, params: list[Tensor], record: bool) -> Tensor:
        """Gradient of the per-token NLL over the whole training set, accumulated in chunks
        (each chunk adds ``sum NLL / #tokens of the whole set``), then summed over ranks."""
        x, y, _ = self._train_shard()
        n_tok = int((self.trainer.datamodule.train_set.x >= 0).sum())
        for p in params:
            p.grad = None
        total = torch.zeros((), device=self.device)
        step = self.batching.chunk_size
        for lo in range(0, x.shape[0], step):
            xb, yb = x[lo:lo + step].to(self.device), y[lo:lo + step].to(self.device)
            mb = xb >= 0
            loss = self._nll_sum(xb, yb, mb) / n_tok
            loss.backward()
            total += loss.detach()
            if record:
                if self.track_train_acc:
                    self._update_acc(self.train_acc, xb, yb, mb)
                else:  # keep the metric "updated" so the inherited logging yields NaN silently
                    self.train_acc.update(yb[:0], yb[:0])
        all_reduce_gradients(params)
        if self.trainer.world_size > 1:
            total = self.trainer.strategy.reduce(total, reduce_op="sum")
        return total

    # ------------------------------------------------------------------ evaluation
    def _eval_step(self, batch, prefix: str) -> None:
        x, y = batch
        mask = x >= 0
        n_tok = mask.sum()
        ll = self.chain_model.log_likelihood(x, mask, y if self.chain_model.supervised else None)
        loss = -ll.sum() / n_tok
        metric = self.val_loss if prefix == "val" else self.test_loss
        metric.update(loss, weight=n_tok)
        self.log(f"{prefix}/loss", metric, on_step=False, on_epoch=True, prog_bar=prefix == "val")
        if prefix == "val":
            self._update_acc(self.val_acc, x, y, mask)
            self.log("val/acc", self.val_acc, on_step=False, on_epoch=True, prog_bar=True)

    def validation_step(self, batch, batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch, batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def on_test_epoch_end(self) -> None:
        dm = self.trainer.datamodule
        scores, curves = self.evaluate_split(dm.test_set.x, dm.test_set.y)
        for k in ("acc", "seq_acc", "ll_per_token", "ece", "bayes_acc", "gap_to_bayes_acc"):
            if k in scores:
                self.log(f"test/{k}", scores[k])
        pred_perm = scores.pop("_confusion")
        self.test_report = dict(scores, confusion_matrix=pred_perm)
        self.reliability = {k: {n: v.tolist() for n, v in r.items()} for k, r in curves.items()}
        if self.trainer.is_global_zero:
            out = Path(self.trainer.default_root_dir) / "plots"
            calibration.plot_reliability(curves, out / "reliability.png",
                                         title=f"{type(self.model).__name__}: test ECE {scores['ece']:.3f}")
            (out / "reliability.json").write_text(json.dumps(self.reliability))

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

    def final_train_metrics(self, split) -> dict[str, float]:
        """Nothing here: :class:`ChainReport` scores the train split with the chain model's own
        measures (per-token log-likelihood, states matched on the validation split)."""
        return {}

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
