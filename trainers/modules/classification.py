"""``module=classification``: cross-entropy on per-sample class logits."""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.nn import functional as F
from torchmetrics import Metric, MetricCollection
from torchmetrics.classification import (MulticlassAccuracy, MulticlassConfusionMatrix, MulticlassF1Score,
                                         MulticlassPrecision, MulticlassRecall)

from shiftlab.trainers.modules.base import TaskLoss, TaskModule
from shiftlab.trainers.modules.running import RunningAccuracy, accuracy_state_from_stat_scores


class ClassificationModule(TaskModule):
    """Trains a classifier (``model(x)`` -> logits) with cross-entropy; the test report holds
    micro accuracy, macro / per-class precision, recall, F1 and the confusion matrix."""

    task = "classification"
    summary_metrics: tuple[str, ...] = ("train/loss", "train/acc", "train/acc_vs_true_labels", "test/loss",
                                        "test/acc", "test/precision_macro", "test/recall_macro", "test/f1_macro")

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        k = self.num_classes
        self.test_metrics = MetricCollection({
            "acc": MulticlassAccuracy(k, average="micro"),
            "precision_macro": MulticlassPrecision(k, average="macro"),
            "recall_macro": MulticlassRecall(k, average="macro"),
            "f1_macro": MulticlassF1Score(k, average="macro"),
            "precision_per_class": MulticlassPrecision(k, average=None),
            "recall_per_class": MulticlassRecall(k, average=None),
            "confusion_matrix": MulticlassConfusionMatrix(k),
        })

    def setup(self, stage: str) -> None:
        """One training sample as ``example_input_array``: the model summary then shows input/output sizes
        and real FLOPs instead of "FLOPs 0"."""
        super().setup(stage)
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        split = getattr(dm, "train_set", None)
        if self.example_input_array is None and getattr(split, "x", None) is not None and len(split.x):
            self.example_input_array = split.x[:1].clone()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Also: a mid-epoch checkpoint of a run whose training accuracy was a ``MulticlassAccuracy``
        resumes into :class:`RunningAccuracy` (runs before the change; the run contract restores
        the states by name, after this hook)."""
        super().on_load_checkpoint(checkpoint)
        states = (checkpoint.get("shiftlab_mid_epoch") or {}).get("train_metrics") or {}
        if "train_acc" in states:
            states["train_acc"] = accuracy_state_from_stat_scores(states["train_acc"])

    def loss(self, x: Tensor, y: Tensor, total: int | None = None) -> TaskLoss:
        logits = self.model(x)
        value = F.cross_entropy(logits, y) if total is None else \
            F.cross_entropy(logits, y, reduction="none").sum() / total
        return TaskLoss(value, y.shape[0], logits)

    def eval_loss(self, x: Tensor, y: Tensor) -> TaskLoss:
        logits = self.model(x)
        per_sample = F.cross_entropy(logits, y, reduction="none")
        return TaskLoss(per_sample.mean(), y.shape[0], logits, per_sample)

    def count_units(self, x: Tensor) -> int:
        return x.shape[0]

    def make_accuracy(self, train: bool) -> Metric:
        # the train metric runs every step: a correct count (the same micro accuracy, see running.py)
        return RunningAccuracy() if train else MulticlassAccuracy(self.num_classes, average="micro")

    @torch.no_grad()
    def update_accuracy(self, metric: Metric, x: Tensor, y: Tensor, output: Any) -> None:
        metric.update(output.detach(), y)

    def update_test_metrics(self, x: Tensor, y: Tensor, output: Any) -> None:
        self.test_metrics.update(output, y)

    def finish_test(self) -> dict[str, Any]:
        values = self.test_metrics.compute()
        for name in ("acc", "precision_macro", "recall_macro", "f1_macro"):
            self.log(f"test/{name}", values[name])
        self.test_metrics.reset()
        return {k: v.detach().cpu().tolist() for k, v in values.items()}

    def final_train_metrics(self, split) -> dict[str, float]:
        """Loss and accuracy of the final model (eval mode) on the whole training split, against the
        given labels and, when label noise corrupted some, the true ones (for ``summary.json``)."""
        from shiftlab.trainers.summary import evaluate_split

        final = evaluate_split(self.model, split.x, split.y, self.device)
        out = {"train/loss": final["loss"], "train/acc": final["acc"]}
        if split.corrupted is not None and bool(split.corrupted.any()):
            out["train/acc_vs_true_labels"] = evaluate_split(self.model, split.x, split.y_true, self.device)["acc"]
        return out
