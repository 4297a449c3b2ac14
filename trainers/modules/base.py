"""The machinery every task shares: mini-batch steps, full-batch steps (delegated to
:class:`~shiftlab.trainers.full_batch.FullBatchLoop`), the logging policy, optimizer and
scheduler configuration, and the evaluation / test-report skeleton.

A task (``module=classification|sequence``) supplies only what differs: its loss, how many units
(samples, tokens) a split holds, its accuracy metric and update, and its test report. The contract
with the model is declared, not patched in: a model's ``task`` attribute names the module that
trains it (``"classification"`` when absent), and a module refuses any other.
"""
from __future__ import annotations

import abc
import copy
import math
from typing import Any, Callable, NamedTuple

import lightning as L
from torch import Tensor, nn
from torchmetrics import CatMetric, MeanMetric, Metric

from shiftlab.trainers.batching import FullBatch, MiniBatch
from shiftlab.trainers.full_batch import FullBatchLoop
from shiftlab.trainers.modules.grouped import check_grouped_fit, groups_done, shift_batch_progress
from shiftlab.trainers.modules.running import RunningMean


class TaskLoss(NamedTuple):
    """A task's loss on one batch or chunk."""

    value: Tensor  # the loss to backpropagate (a mean, or a chunk's sum / the split's count)
    units: Tensor | int  # samples or tokens in the batch: the weight of ``value`` in epoch means
    output: Any = None  # the forward pass's output, handed to ``update_accuracy``
    per_unit: Tensor | None = None  # per-unit losses (evaluation only; ``val/loss_se``)


_AUTO_PROGRESS = "epoch_loop.automatic_optimization.optim_progress"
_MANUAL_PROGRESS = "epoch_loop.manual_optimization.optim_step_progress"


def adopt_step_progress(fit_loop: dict[str, Any], manual: bool) -> None:
    """Copy the optimizer-step progress of a fit loop's state (Lightning 2.x layout) from the loop
    that ran the steps to the one about to run (``manual``), when the latter has none."""
    auto, man = fit_loop.get(_AUTO_PROGRESS), fit_loop.get(_MANUAL_PROGRESS)
    if not isinstance(auto, dict) or not isinstance(man, dict) or "step" not in auto.get("optimizer", {}):
        return
    steps = lambda progress: progress["total"]["completed"]  # noqa: E731
    if manual and steps(man) == 0 < steps(auto["optimizer"]["step"]):
        fit_loop[_MANUAL_PROGRESS] = copy.deepcopy(auto["optimizer"]["step"])
    elif not manual and steps(auto["optimizer"]["step"]) == 0 < steps(man):
        auto["optimizer"]["step"] = copy.deepcopy(man)


class TaskModule(L.LightningModule, metaclass=abc.ABCMeta):
    """Trains ``model`` on one task under either batching regime.

    Args:
        model: the network (built from the ``model`` and ``norm`` groups).
        optimizer: ``params -> Optimizer`` (the ``optimizer`` group, ``_partial_``).
        scheduler: ``(optimizer, max_epochs) -> LRScheduler`` or None.
        batching: :class:`MiniBatch` or :class:`FullBatch`.
        num_classes: number of classes (or hidden states / tags).
        compile_model: compile the network's forward with ``torch.compile`` (``nn.Module.compile``:
            in place, so parameter names and checkpoints are unchanged).
            Off by default: compilation takes tens of seconds, which small runs never win back
            on a CPU; forward hooks (probing callbacks) cause graph breaks.
        manual_optimization: mini-batch steps written out in ``training_step`` (zero_grad,
            ``manual_backward``, ``optimizer.step()``; Lightning's manual optimization) instead of
            Lightning's automatic closure loop. Same updates in the same order, and the callbacks'
            backward / optimizer-step hooks (the divergence guard's gradient check) still run; it
            saves Lightning's closure and zero-grad hooks (0.04-0.07 ms a step on the digits MLP,
            2-core CPU). Off by default: the gain is within the benchmark's noise on a loaded
            machine, and checkpoints then keep the automatic loop's progress layout, which
            ``launcher=stacked`` writes too (a checkpoint resumes under either setting, see
            :meth:`on_load_checkpoint`). Runs with Lightning's gradient clipping or gradient
            accumulation keep the automatic loop (Lightning supports them only there), and so do
            DDP runs.
        steps_per_call: optimizer steps per ``training_step`` call (mini-batch only; Keras'
            ``steps_per_execution``). Why: Lightning's fixed cost per call (hooks, loop bookkeeping,
            optimizer wrapper, logging connector) is as large as a whole step of the small models
            here; with N > 1 the training loader yields groups of up to N consecutive batches (the
            same batches in the same order: the epoch's last group may be shorter) and the call
            runs them with manual optimization (zero_grad, ``manual_backward``, ``optimizer.step()``
            per batch; Lightning counts each step in ``global_step`` and calls the callbacks'
            backward / optimizer-step hooks per step), so training is the same as with N = 1: same
            weights, optimizer state, step count, logged metrics (the logging step counts batches).
            What it costs: the per-loader-item hooks (``on_train_batch_start`` / ``_end``) run
            once per group, so a signal stops the run at the end of the current group (the
            interrupted.ckpt resumes exactly, under any N), the progress bar counts groups, and
            callbacks that read every batch (step probes, step-wise checkpoints) are refused
            (:func:`~shiftlab.trainers.modules.grouped.per_step_hook_reason`); so are full batch,
            Lightning's clipping and accumulation, DDP, workers and loop options counted in loader
            items (config checks; DDP when the trainer starts). Checkpoints count batches, not
            groups, so they resume under any N and in stacked runs (:mod:`.grouped`).
    """

    task: str = ""  # the model's ``task`` this module trains; the config option's name
    # What a module logs during fit (callbacks' ``monitor`` keys are checked against it before
    # training) and the metric keys it adds to summary.json (``optimized_metric`` is checked
    # against them); tests/test_bad_input.py runs a fit and compares.
    logged_metrics: tuple[str, ...] = ("train/loss", "train/acc", "val/loss", "val/acc")
    summary_metrics: tuple[str, ...] = ()
    track_train_acc: bool = True

    def __init__(self, model: nn.Module, optimizer: Callable, scheduler: Callable | None,
                 batching: MiniBatch | FullBatch, num_classes: int, compile_model: bool = False,
                 manual_optimization: bool = False, steps_per_call: int = 1) -> None:
        super().__init__()
        if isinstance(steps_per_call, bool) or not isinstance(steps_per_call, int) or steps_per_call < 1:
            raise ValueError(f"module.steps_per_call={steps_per_call} is not allowed; allowed: an integer >= 1")
        if steps_per_call > 1 and isinstance(batching, FullBatch):
            raise ValueError(f"module.steps_per_call={steps_per_call} is not allowed with full batch (its own "
                             "loop takes one step per epoch); allowed: 1")
        wants = getattr(model, "task", "classification")
        if wants != self.task:
            raise ValueError(f"module={self.task} is not allowed for model {type(model).__name__}; "
                             f"allowed: module={wants}")
        self.model = model
        if compile_model:
            model.compile()
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.batching = batching
        self.num_classes = num_classes
        self.full_batch = FullBatchLoop(batching) if isinstance(batching, FullBatch) else None
        self.manual_optimization = bool(manual_optimization)
        self.steps_per_call = steps_per_call
        # with steps_per_call > 1: (batch index in the epoch, loss) of each step of the last call
        # (the divergence guard checks every step), and the batches trained in this epoch so far
        self.step_losses: list[tuple[int, Tensor]] | None = None
        self._epoch_batches = 0
        self._resume_at: tuple[int, int] | None = None  # (epoch, batches done): a mid-epoch resume
        self.train_acc = self.make_accuracy(train=True)
        self.val_acc = self.make_accuracy(train=False)
        # the training loss is updated every step: the cheap running mean (same values as MeanMetric)
        self.train_loss, self.val_loss, self.test_loss = RunningMean(), MeanMetric(), MeanMetric()
        self.val_sample_losses = CatMetric()  # per-unit losses -> val/loss_se (early stopping)
        self.test_report: dict[str, Any] = {}
        self.last_loss: Tensor | None = None

    @property
    def automatic_optimization(self) -> bool:
        """Whether Lightning's automatic loop steps the optimizer: not for full batch (one step per
        epoch from :class:`FullBatchLoop`), not with ``manual_optimization`` unless the trainer asks
        for gradient clipping or accumulation (Lightning implements them in the automatic loop only)
        or runs several processes (under 2-process gloo DDP the manual loop reached the same weights
        but different validation metrics on the BatchNorm MLP; not resolved, so DDP keeps the
        automatic loop).

        Why a property: Lightning checks this before any hook runs, and the trainer's settings
        decide it, so it is read from the attached trainer rather than fixed at construction."""
        if self.full_batch is not None or self.steps_per_call > 1:
            return False
        if not self.manual_optimization:
            return True
        trainer = self._trainer
        return trainer is not None and (bool(trainer.gradient_clip_val) or trainer.accumulate_grad_batches != 1
                                        or trainer.world_size > 1)

    @automatic_optimization.setter
    def automatic_optimization(self, value: bool) -> None:
        self.manual_optimization = not value

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """A checkpoint written under the other optimization loop resumes with its step count.

        Why: Lightning counts optimizer steps (``global_step``) in the loop that ran them, the
        automatic or the manual one, and a resumed run reads only its own; without this a run
        resumed across a change of ``manual_optimization`` would restart at step 0. Called before
        Lightning restores the loops, so the counts are copied in the checkpoint dict."""
        fit = (checkpoint.get("loops") or {}).get("fit_loop")
        if fit and self.full_batch is None:
            adopt_step_progress(fit, manual=not self.automatic_optimization)
        if self.steps_per_call > 1 and self.full_batch is None and self._trainer is not None:
            # the checkpoint counts batches (see on_save_checkpoint): count this run's groups instead
            mid = checkpoint.get("shiftlab_mid_epoch")
            if mid:
                self._resume_at = (int(mid["epoch"]), int(mid["batches_done"]))
            progress = (fit or {}).get("epoch_loop.batch_progress")
            if progress:
                done = int(progress["current"].get("processed", 0))
                shift_batch_progress(fit, groups_done(done, self._batches_per_epoch(), self.steps_per_call))

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """With ``steps_per_call > 1``: the fit loop's batch counts and the run contract's
        ``batches_done`` in batches, as an N = 1 run writes them (Lightning counted groups). Runs
        after the callbacks' hooks, so the run contract's mid-epoch entry is already there."""
        if self.steps_per_call == 1 or self.full_batch is not None:
            return
        fit = (checkpoint.get("loops") or {}).get("fit_loop")
        if fit:  # a mini-batch run takes one step per batch: the total is the step count
            shift_batch_progress(fit, self._epoch_batches, total_processed=self.trainer.global_step)
        mid = checkpoint.get("shiftlab_mid_epoch")
        if mid:
            mid["batches_done"] = self._epoch_batches

    def _batches_per_epoch(self) -> int:
        dm = self.trainer.datamodule
        return math.ceil(len(dm.train_set) / dm.batch_size)

    # ---------------------------------------------------------------- what a task supplies
    @abc.abstractmethod
    def loss(self, x: Tensor, y: Tensor, total: int | None = None) -> TaskLoss:
        """Training loss: the mean over the batch's units, or (``total`` given, a full-batch chunk)
        the sum over its units divided by ``total``."""
        ...

    @abc.abstractmethod
    def eval_loss(self, x: Tensor, y: Tensor) -> TaskLoss:
        """Validation / test loss (mean over the batch's units)."""
        ...

    @abc.abstractmethod
    def count_units(self, x: Tensor) -> int:
        """Units (samples, tokens) in a split: the divisor of the full-batch mean."""
        ...

    @abc.abstractmethod
    def make_accuracy(self, train: bool) -> Metric:
        ...

    @abc.abstractmethod
    def update_accuracy(self, metric: Metric, x: Tensor, y: Tensor, output: Any) -> None:
        """Add the batch's predictions to an accuracy metric (``output`` from the loss's forward)."""
        ...

    def update_test_metrics(self, x: Tensor, y: Tensor, output: Any) -> None:
        """Per-batch test metrics besides the loss (none by default)."""

    def finish_test(self) -> dict[str, Any]:
        """Log the test figures and return the test report (``test/*`` in summary.json)."""
        return {}

    def final_train_metrics(self, split) -> dict[str, float]:
        """Figures of the final model on the whole training split, for ``summary.json``."""
        return {}

    # ---------------------------------------------------------------- training
    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)

    def setup(self, stage: str) -> None:
        if stage == "fit" and self.steps_per_call > 1 and self._trainer is not None:
            check_grouped_fit(self.trainer, self.steps_per_call)

    def on_fit_start(self) -> None:
        if self.full_batch is not None:
            self.full_batch.on_fit_start(self)

    def on_train_epoch_start(self) -> None:
        self.train_loss.reset()
        self.train_acc.reset()
        resume, self._resume_at = self._resume_at, None
        self._epoch_batches = resume[1] if resume and resume[0] == self.current_epoch else 0

    def training_step(self, batch, batch_idx: int):
        if self.full_batch is not None:
            self.last_loss = self.full_batch.step(self)
            self.train_loss.update(self.last_loss)
            self._log_train_epoch()
            return None
        if self.steps_per_call > 1:
            return self._grouped_steps(batch, batch_idx)
        x, y = batch
        out = self._train_forward(x, y)
        self.last_loss = loss = out.value.detach()
        if not self.automatic_optimization:
            self._manual_step(self.optimizers(), out.value)
        if batch_idx + 1 >= self.trainer.num_training_batches:
            self._log_train_epoch()
        return out.value if self.automatic_optimization else loss

    def _train_forward(self, x: Tensor, y: Tensor) -> TaskLoss:
        """A training batch's loss, added to the epoch's running loss and accuracy."""
        out = self.loss(x, y)
        self.train_loss.update(out.value.detach(), out.units)
        if self.track_train_acc:
            self.update_accuracy(self.train_acc, x, y, out.output)
        return out

    def _manual_step(self, opt, value: Tensor) -> None:
        """Lightning's automatic order: (forward,) zero_grad, backward, (hooks, clipping) step."""
        opt.zero_grad()
        self.manual_backward(value)
        opt.step()

    def _grouped_steps(self, group: list, batch_idx: int) -> Tensor | None:
        """One optimizer step per batch of the loader's group, as the N = 1 manual path takes them."""
        opt = self.optimizers()
        trainer = self.trainer
        max_steps = trainer.max_steps if trainer.max_steps is not None else -1
        # filled before each step's update: the divergence guard checks a step's loss before the next
        # update (its optimizer-step hook), as it would after each call with N = 1
        losses: list[tuple[int, Tensor]] = []
        self.step_losses = losses
        for x, y in group:
            if 0 <= max_steps <= trainer.global_step:  # the N = 1 run stops here too
                break
            out = self._train_forward(x, y)
            losses.append((self._epoch_batches, out.value.detach()))
            self._epoch_batches += 1
            self._manual_step(opt, out.value)
        if not losses:
            return None
        self.last_loss = losses[-1][1]
        # Lightning adds 1 per loader item to the logging step (metrics.csv's ``step``); the rest of the
        # group's steps here, so the logging step counts batches as with N = 1
        trainer.fit_loop.epoch_loop._batches_that_stepped += len(losses) - 1
        if batch_idx + 1 >= trainer.num_training_batches:
            # the batch size Lightning would infer from an N = 1 call's batch (it weights the epoch value)
            self._log_train_epoch(batch_size=int(group[len(losses) - 1][0].shape[0]))
        return self.last_loss

    def _log_train_epoch(self, batch_size: int | None = None) -> None:
        """Log the epoch's train loss / accuracy once, from the last training step.

        Why not ``self.log`` every step: Lightning's per-call logging cost is about a millisecond,
        as much as a whole step of a small model. Logging from the last step (rather than from
        ``on_train_epoch_end``) makes the values visible to every callback's epoch-end hook.
        ``compute()`` reduces across DDP ranks.
        """
        self.log("train/loss", self.train_loss.compute(), on_step=False, on_epoch=True, prog_bar=True,
                 batch_size=batch_size)
        if self.track_train_acc:
            self.log("train/acc", self.train_acc.compute(), on_step=False, on_epoch=True, prog_bar=True,
                     batch_size=batch_size)

    def on_train_epoch_end(self) -> None:
        if self.full_batch is not None:
            self.full_batch.on_train_epoch_end(self)
        elif not self.automatic_optimization:
            # manual optimization: Lightning does not step the (epoch-wise) scheduler itself
            sch = self.lr_schedulers()
            if sch is not None:
                sch.step()

    # ---------------------------------------------------------------- evaluation
    def validation_step(self, batch, batch_idx: int) -> None:
        x, y = batch
        out = self.eval_loss(x, y)
        self.val_loss.update(out.value, weight=out.units)
        if out.per_unit is not None:
            self.val_sample_losses.update(out.per_unit.detach())
        self.update_accuracy(self.val_acc, x, y, out.output)
        self.log("val/loss", self.val_loss, on_step=False, on_epoch=True, prog_bar=True)
        self.log("val/acc", self.val_acc, on_step=False, on_epoch=True, prog_bar=True)

    def on_validation_epoch_end(self) -> None:
        """``val/loss_se``: standard error of ``val/loss`` over the validation units (all ranks;
        stopping rules read it as the noise level of the curve)."""
        if self.val_sample_losses.update_count:
            losses = self.val_sample_losses.compute().flatten()
            if losses.numel() > 1:
                self.log("val/loss_se", losses.std() / losses.numel() ** 0.5)
        self.val_sample_losses.reset()

    def test_step(self, batch, batch_idx: int) -> None:
        x, y = batch
        out = self.eval_loss(x, y)
        self.test_loss.update(out.value, weight=out.units)
        self.update_test_metrics(x, y, out.output)
        self.log("test/loss", self.test_loss, on_step=False, on_epoch=True)

    def on_test_epoch_end(self) -> None:
        self.test_report = self.finish_test()

    # ---------------------------------------------------------------- optimizers
    def configure_optimizers(self):
        opt = self.optimizer_factory(self.model.parameters())
        if self.scheduler_factory is None:
            return opt
        sch = self.scheduler_factory(opt, max_epochs=self.trainer.max_epochs)
        # Epoch-wise; with manual optimization (full batch) FullBatchLoop steps it.
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sch, "interval": "epoch"}}
