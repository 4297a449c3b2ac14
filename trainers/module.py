"""The LightningModule that trains a classifier under either batching regime."""
from __future__ import annotations

import warnings
from typing import Any, Callable

import lightning as L
import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.parallel import DistributedDataParallel
from torchmetrics import CatMetric, MeanMetric, MetricCollection
from torchmetrics.classification import (MulticlassAccuracy, MulticlassConfusionMatrix, MulticlassF1Score,
                                         MulticlassPrecision, MulticlassRecall)

from shiftlab.trainers.batching import FullBatch, MiniBatch
from shiftlab.trainers.full_batch import accumulate_full_gradient, all_reduce_gradients, grad_norm_penalty_fd

_BN_TYPES = (nn.modules.batchnorm._BatchNorm,)


def has_batch_statistics(model: nn.Module) -> bool:
    return any(isinstance(m, _BN_TYPES) for m in model.modules())


class ClassificationModule(L.LightningModule):
    """Trains ``model`` with cross-entropy.

    Args:
        model: the network (built from the ``model`` and ``norm`` groups).
        optimizer: ``params -> Optimizer`` (the ``optimizer`` group, ``_partial_``).
        scheduler: ``(optimizer, max_epochs) -> LRScheduler`` or None.
        batching: :class:`MiniBatch` or :class:`FullBatch`.
        num_classes: number of classes (metrics).
    """

    # What this module logs during fit (callbacks' ``monitor`` keys are checked against it before
    # training) and the metric keys it adds to summary.json (``optimized_metric`` is checked
    # against them); tests/test_bad_input.py runs a fit and compares.
    logged_metrics: tuple[str, ...] = ("train/loss", "train/acc", "val/loss", "val/acc")
    summary_metrics: tuple[str, ...] = ("train/loss", "train/acc", "train/acc_vs_true_labels", "test/loss",
                                        "test/acc", "test/precision_macro", "test/recall_macro", "test/f1_macro")

    def __init__(self, model: nn.Module, optimizer: Callable, scheduler: Callable | None,
                 batching: MiniBatch | FullBatch, num_classes: int) -> None:
        super().__init__()
        self.model = model
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.batching = batching
        self.num_classes = num_classes
        self.full_batch = isinstance(batching, FullBatch)
        self.automatic_optimization = not self.full_batch
        k = num_classes
        self.train_acc = MulticlassAccuracy(k, average="micro", validate_args=False)
        self.val_acc = MulticlassAccuracy(k, average="micro")
        self.train_loss, self.val_loss, self.test_loss = MeanMetric(), MeanMetric(), MeanMetric()
        self.val_sample_losses = CatMetric()  # per-sample losses -> val/loss_se (early stopping)
        self.test_metrics = MetricCollection({
            "acc": MulticlassAccuracy(k, average="micro"),
            "precision_macro": MulticlassPrecision(k, average="macro"),
            "recall_macro": MulticlassRecall(k, average="macro"),
            "f1_macro": MulticlassF1Score(k, average="macro"),
            "precision_per_class": MulticlassPrecision(k, average=None),
            "recall_per_class": MulticlassRecall(k, average=None),
            "confusion_matrix": MulticlassConfusionMatrix(k),
        })
        self.test_report: dict[str, Any] = {}
        self.last_loss: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    # ---------------------------------------------------------------- training
    def on_fit_start(self) -> None:
        if self.full_batch and has_batch_statistics(self.model):
            warnings.warn("batching=full with BatchNorm: each chunk of batching.chunk_size samples is "
                          "normalized with its own statistics (ghost-batch semantics), so the full-batch "
                          "gradient depends on the chunk size", stacklevel=1)
        if self.full_batch and isinstance(self.trainer.strategy.model, DistributedDataParallel):
            # Full-batch steps reduce gradients themselves (weighted by the global sample count).
            self.trainer.strategy.model.require_backward_grad_sync = False

    def training_step(self, batch, batch_idx: int):
        if self.full_batch:
            return self._full_batch_step()
        x, y = batch
        logits = self.model(x)
        loss = F.cross_entropy(logits, y)
        self.last_loss = loss.detach()
        self.train_loss.update(self.last_loss, weight=y.shape[0])
        self.train_acc.update(logits.detach(), y)
        if batch_idx + 1 >= self.trainer.num_training_batches:
            self._log_train_epoch()
        return loss

    def on_train_epoch_start(self) -> None:
        self.train_loss.reset()
        self.train_acc.reset()

    def _log_train_epoch(self) -> None:
        """Log the epoch's train loss / accuracy once, from the last training step.

        Why not ``self.log`` every step: Lightning's per-call logging cost is about a millisecond,
        as much as a whole step of a small model. Logging from the last step (rather than from
        ``on_train_epoch_end``) makes the values visible to every callback's epoch-end hook.
        ``compute()`` reduces across DDP ranks.
        """
        self.log("train/loss", self.train_loss.compute(), on_step=False, on_epoch=True, prog_bar=True)
        self.log("train/acc", self.train_acc.compute(), on_step=False, on_epoch=True, prog_bar=True)

    def _train_shard(self) -> tuple[torch.Tensor, torch.Tensor, int]:
        data = self.trainer.datamodule.train_set
        world, rank = self.trainer.world_size, self.trainer.global_rank
        x, y = data.x, data.y
        if world > 1:
            x, y = x[rank::world], y[rank::world]
        return x, y, data.x.shape[0]

    def _full_gradient(self, params: list[torch.Tensor], record: bool) -> torch.Tensor:
        x, y, n_total = self._train_shard()
        for p in params:
            p.grad = None

        def on_chunk(logits: torch.Tensor, yb: torch.Tensor) -> None:
            if record:
                self.train_acc.update(logits, yb)

        loss = accumulate_full_gradient(self.model, x, y, self.batching.chunk_size, n_total,
                                        self.device, on_chunk=on_chunk)
        all_reduce_gradients(params)
        if self.trainer.world_size > 1:
            loss = self.trainer.strategy.reduce(loss, reduce_op="sum")
        return loss

    def _full_batch_step(self) -> None:
        opt = self.optimizers()
        params = [p for p in self.model.parameters() if p.requires_grad]
        buffers = [b for b in self.model.buffers() if b.is_floating_point()]
        first = [True]

        def closure() -> torch.Tensor:
            record = first[0]
            loss = self._full_gradient(params, record)
            b = self.batching
            if b.grad_norm_penalty:
                grad_norm_penalty_fd(params, lambda: self._full_gradient(params, False), b.grad_norm_penalty,
                                     b.grad_penalty_eps, buffers)
            if b.clip_grad_norm:
                torch.nn.utils.clip_grad_norm_(params, b.clip_grad_norm)
            if record:
                self.last_loss = loss
                first[0] = False
            return loss

        opt.step(closure=closure)
        self.train_loss.update(self.last_loss)
        self._log_train_epoch()
        return None

    def on_train_epoch_end(self) -> None:
        if self.full_batch:
            sch = self.lr_schedulers()
            if sch is not None:
                sch.step()

    # ---------------------------------------------------------------- evaluation
    def validation_step(self, batch, batch_idx: int) -> None:
        x, y = batch
        logits = self.model(x)
        per_sample = F.cross_entropy(logits, y, reduction="none")
        self.val_loss.update(per_sample.mean(), weight=y.shape[0])
        self.val_sample_losses.update(per_sample.detach())
        self.val_acc.update(logits, y)
        self.log("val/loss", self.val_loss, on_step=False, on_epoch=True, prog_bar=True)
        self.log("val/acc", self.val_acc, on_step=False, on_epoch=True, prog_bar=True)

    def on_validation_epoch_end(self) -> None:
        """``val/loss_se``: standard error of ``val/loss`` over the validation samples (all
        ranks; stopping rules read it as the noise level of the curve)."""
        if self.val_sample_losses.update_count:
            losses = self.val_sample_losses.compute().flatten()
            if losses.numel() > 1:
                self.log("val/loss_se", losses.std() / losses.numel() ** 0.5)
        self.val_sample_losses.reset()

    def test_step(self, batch, batch_idx: int) -> None:
        x, y = batch
        logits = self.model(x)
        self.test_loss.update(F.cross_entropy(logits, y), weight=y.shape[0])
        self.test_metrics.update(logits, y)
        self.log("test/loss", self.test_loss, on_step=False, on_epoch=True)

    def on_test_epoch_end(self) -> None:
        values = self.test_metrics.compute()
        for name in ("acc", "precision_macro", "recall_macro", "f1_macro"):
            self.log(f"test/{name}", values[name])
        self.test_report = {k: v.detach().cpu().tolist() for k, v in values.items()}
        self.test_metrics.reset()

    def final_train_metrics(self, split) -> dict[str, float]:
        """Loss and accuracy of the final model (eval mode) on the whole training split, against the
        given labels and, when label noise corrupted some, the true ones (for ``summary.json``)."""
        from shiftlab.trainers.summary import evaluate_split

        final = evaluate_split(self.model, split.x, split.y, self.device)
        out = {"train/loss": final["loss"], "train/acc": final["acc"]}
        if split.corrupted is not None and bool(split.corrupted.any()):
            out["train/acc_vs_true_labels"] = evaluate_split(self.model, split.x, split.y_true, self.device)["acc"]
        return out

    # ---------------------------------------------------------------- optimizers
    def configure_optimizers(self):
        opt = self.optimizer_factory(self.model.parameters())
        if self.scheduler_factory is None:
            return opt
        sch = self.scheduler_factory(opt, max_epochs=self.trainer.max_epochs)
        # Epoch-wise; with manual optimization (full batch) it is stepped in on_train_epoch_end.
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sch, "interval": "epoch"}}
