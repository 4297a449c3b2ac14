"""Train K configs that differ only in their seed (and in per-member values) as one stacked model.

Each member is built exactly as its plain run builds it (``seed_everything(seed)``, the data module,
then the module), so it starts from the same weights on the same split. Parameters are stacked with
``torch.func.stack_module_state`` and the forward pass is ``vmap(functional_call)``. The loss is the SUM
of the members' mean losses, so member k's slice of each stacked gradient is exactly its own gradient.
One optimizer holds member k's slices (views of the stacked tensors) as param group k, built by member k's
own optimizer factory, so each member keeps its own learning rate and weight decay and a scheduler scales
each group from its own base rate; SGD / momentum / Adam / AdamW are elementwise, so each member gets
exactly its own update. When every member's group has the same settings (a seed sweep), the optimizer
holds the stacked tensors themselves as one group instead (the same elementwise update, in a few large
tensor operations rather than K times as many small ones: the optimizer step was about a third of the
training time of 8 digits MLPs with Adam). A member that stopped (early stopping, divergence) freezes:
its slices get no gradient, so the optimizer skips them (one shared group: its slices of the parameters
and of the optimizer state are put back after each epoch, with its BatchNorm buffers). Each member draws its own data order from the same seeded sampler
its plain run uses.

BatchNorm: the buffers (running_mean / running_var / num_batches_tracked) are stacked like the
parameters and passed to ``vmap`` as batched inputs, so each member normalizes with its own batch
statistics and BN's in-place running-stat update writes member k's slice only (the "Patching Batch
Norm" way of torch.func that keeps the module's semantics exact; ``replace_all_batch_norm_modules_``
would drop the running statistics). Validation and test run the template in eval mode (running
statistics), training in train mode, as Lightning switches the plain module. The same holds for
``norm=ghost_bn`` (per-chunk statistics and the closed-form K-chunk running update read no Python
number from a buffer) and ``norm=batch_renorm`` (its r/d limits come from the batched step count
through ``renorm_limits_tensor``) and ``norm=noisy_bn`` (its noise as dropout's masks, below); they keep
BatchNorm's buffer names, so a stopped member's buffers are put back as plain BN's are. ``momentum=None``
(a cumulative average that reads ``num_batches_tracked`` as a Python number) is refused in
:mod:`~shiftlab.trainers.stacked.grouping`.

``batching=full``: one step per epoch from the gradient of the mean loss over the whole training set,
accumulated over the same ``chunk_size`` chunks in the same order as
:class:`shiftlab.trainers.full_batch.FullBatchLoop` (with BatchNorm each chunk is normalized with its
own statistics there and here); gradient clipping and the finite-difference gradient-norm penalty are
applied per member (each member's own norm and step ``h``).

Dropout (:mod:`shiftlab.trainers.stacked.dropout`): exact on a CPU, where ATen's dropout multiplies by
``bernoulli_(1 - p) / (1 - p)`` noise from the global generator: member k draws its masks (plain layer
order and shapes, every train-mode forward) from a generator that holds its plain run's global state and
makes the plain run's other draws (DataLoader iterators) at the same points; masks are batched ``vmap``
inputs. ``norm=noisy_bn`` draws its noise from the same generator in the same way, interleaved with the
masks in the plain forward's call order. Not on CUDA (the fused Philox kernel cannot be replayed):
independent generators there.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any, Callable

import lightning as L
import torch
from omegaconf import DictConfig
from torch import Tensor
from torch.func import functional_call, stack_module_state, vmap
from torch.nn import functional as F

from shiftlab.trainers.build import build_datamodule, build_module
from shiftlab.trainers.data.base import EpochSeededSampler
from shiftlab.trainers.stacked.divergence import StackedGuard
from shiftlab.trainers.stacked.dropout import MemberDropout
from shiftlab.trainers.stacked.members import MemberCallbacks, measure_memorization
from shiftlab.trainers.stacked.slices import MemberSlices, same_settings


@dataclass
class Member:
    """One job of a stacked group: its config, data module, plain module and what training recorded."""

    cfg: DictConfig
    dm: Any
    module: Any
    history: list[dict[str, float]] = field(default_factory=list)
    best_score: Tensor | None = None  # the best val/acc so far (ModelCheckpoint's best_model_score)
    best_epoch: int = -1
    train_metrics: dict[str, float] = field(default_factory=dict)
    test_metrics: dict[str, Any] | None = None
    status: str = "completed"
    stop_reason: str = ""
    stopped_step: int | None = None
    test_weights: str = ""
    rng_state: Tensor | None = None  # the global CPU RNG state once the module is built (dropout.py)


def build_member(cfg: DictConfig) -> Member:
    """Data module and module exactly as ``train(cfg)`` builds them (same RNG consumption)."""
    if cfg.get("torch_threads"):
        torch.set_num_threads(int(cfg.torch_threads))
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    dm = build_datamodule(cfg)
    dm.prepare_data()
    dm.setup("fit")
    module = build_module(cfg, dm)
    return Member(cfg, dm, module, rng_state=torch.get_rng_state())


def pick_device(cfg: DictConfig) -> torch.device:
    accel = str(cfg.trainer.get("accelerator", "auto"))
    if accel in ("auto", "gpu", "cuda") and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


class StackedGroup(MemberSlices):
    """The stacked model, optimizer and scheduler of one group, and its training loop."""

    def __init__(self, members: list[Member], device: torch.device) -> None:
        self.members, self.device = members, device
        self.k = len(members)
        lead = members[0]
        self.template = copy.deepcopy(lead.module.model).to("meta").train()
        # its nn.Dropout -> MaskedDropout, NoisyBatchNorm -> GivenNoiseBN
        self.dropout = MemberDropout(self.template, members, device)
        models = [m.module.model for m in members]
        params, buffers = stack_module_state(models)
        self.params = {n: p.detach().to(device).requires_grad_(True) for n, p in params.items()}
        self.buffers = {n: b.to(device) for n, b in buffers.items()}
        self.names = [n for n, _ in lead.module.model.named_parameters()]
        # member i's slices of the stacked parameters (leaves that share their storage): param group i
        self.slices = [{n: self.params[n].detach()[i] for n in self.names} for i in range(self.k)]
        self.optimizer = self._member_optimizer()
        self.max_epochs = int(lead.cfg.trainer.max_epochs)
        fac = lead.module.scheduler_factory
        self.scheduler = fac(self.optimizer, max_epochs=self.max_epochs) if fac is not None else None
        self.active = [True] * self.k  # False: the member stopped (early stopping, divergence) and is frozen
        self.batch_size = lead.dm.batch_size
        self.eval_batch_size = lead.dm.eval_batch_size
        self.n_train = len(lead.dm.train_set)
        if any(len(m.dm.train_set) != self.n_train for m in members):
            raise ValueError("stacked members must have training splits of one size")
        loop = getattr(lead.module, "full_batch", None)
        self.full_batch = loop.batching if loop is not None else None  # FullBatch config, or None
        self.batches = 1 if self.full_batch is not None else math.ceil(self.n_train / self.batch_size)
        self.x_train = torch.stack([m.dm.train_set.x for m in members]).to(device)
        self.y_train = torch.stack([m.dm.train_set.y for m in members]).to(device)
        self.samplers = [EpochSeededSampler(self.n_train, m.dm.seed) for m in members]
        self.forward = vmap(self._forward_one)
        self.guard = StackedGuard(self.k, device, **(lead.cfg.get("divergence") or {}))
        self.callbacks = [MemberCallbacks(m, self, i) for i, m in enumerate(members)]

    def _member_optimizer(self) -> torch.optim.Optimizer:
        """One optimizer, param group i as member i's own optimizer factory builds it over its slices
        (``foreach`` as configured: torch's default takes it on CUDA; on a CPU the per-tensor loop measured
        faster here); or, when all those groups' settings are equal, one group over the stacked tensors
        (``self.shared``)."""
        opts = [m.module.optimizer_factory([sl[n] for n in self.names]) for m, sl in zip(self.members, self.slices)]
        settings = [{k: v for k, v in o.param_groups[0].items() if k != "params"} for o in opts]
        self.shared = self.k > 1 and all(same_settings(s, settings[0]) for s in settings[1:])
        if self.shared:
            return self.members[0].module.optimizer_factory([self.params[n] for n in self.names])
        for o in opts[1:]:
            opts[0].add_param_group(o.param_groups[0])
        return opts[0]

    def predict(self, x: Tensor) -> Tensor:
        """Eval-mode logits (K, b, C) of every member on its own inputs ``x`` (K, b, ...): BatchNorm uses its
        running statistics, as in Lightning's validation loop and the plain probes."""
        self.template.eval()
        try:
            return self.forward(self.params, self.buffers, x)
        finally:
            self.template.train()

    def _forward_one(self, params: dict, buffers: dict, x: Tensor) -> Tensor:
        return functional_call(self.template, (params, buffers), (x,))

    def _losses(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """Per-member mean cross-entropy (K,) and the logits (K, b, C)."""
        logits = self.forward(self.params, self.dropout.with_masks(self.buffers, x), x)
        per_sample = F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none").view(y.shape)
        return per_sample.mean(dim=1), logits

    def _train_epoch(self, epoch: int) -> dict[str, Tensor]:
        """One epoch for every member, stopped ones included (:meth:`train_epoch` puts those back)."""
        self.dropout.loader_draw()  # the plain run's train loader draw (dropout.py)
        if self.full_batch is not None:
            return self.full_batch_epoch(epoch)
        for s in self.samplers:
            s.set_epoch(epoch)
        order = torch.tensor([list(iter(s)) for s in self.samplers], device=self.device)  # (K, N)
        rows = torch.arange(self.k, device=self.device)[:, None]
        loss_sum = torch.zeros(self.k, device=self.device, dtype=torch.float64)
        correct = torch.zeros(self.k, device=self.device, dtype=torch.long)
        for b in range(self.batches):
            idx = order[:, b * self.batch_size:(b + 1) * self.batch_size]
            x, y = self.x_train[rows, idx], self.y_train[rows, idx]
            losses, logits = self._losses(x, y)
            for p in self.params.values():
                p.grad = None
            losses.sum().backward()
            self.guard.before_step(epoch * self.batches + b, self.params.values())
            self._member_grads()
            self.optimizer.step()
            with torch.no_grad():
                self.guard.after_step(epoch * self.batches + b + 1, losses.detach())
                loss_sum += losses.detach().double() * idx.shape[1]
                correct += (logits.argmax(-1) == y).sum(dim=1)
        self.guard.end_epoch()
        if self.scheduler is not None:
            self.scheduler.step()
        return {"train/loss": (loss_sum / self.n_train).float(), "train/acc": correct.float() / self.n_train}

    def _full_gradient(self, correct: Tensor | None) -> Tensor:
        """Each member's full-batch gradient into ``p.grad`` (chunks as ``accumulate_chunks`` walks them:
        ``sum(per-sample loss) / n`` per chunk, natural order); returns the members' mean losses (K,).
        ``correct`` (K,) counts correct predictions when given."""
        for p in self.params.values():
            p.grad = None
        total = torch.zeros(self.k, device=self.device)
        chunk = self.full_batch.chunk_size
        for start in range(0, self.n_train, chunk):
            x, y = self.x_train[:, start:start + chunk], self.y_train[:, start:start + chunk]
            logits = self.forward(self.params, self.dropout.with_masks(self.buffers, x), x)
            per = F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none").view(y.shape)
            losses = per.sum(dim=1) / self.n_train
            losses.sum().backward()
            total += losses.detach()
            if correct is not None:
                with torch.no_grad():
                    correct += (logits.argmax(-1) == y).sum(dim=1)
        return total

    @torch.no_grad()
    def _clip_per_member(self, max_norm: float) -> None:
        """``clip_grad_norm_`` for each member's slice: the norm over its own gradients only."""
        grads = [p.grad for p in self.params.values() if p.grad is not None]
        norms = torch.stack([torch.linalg.vector_norm(g.flatten(1), dim=1) for g in grads])  # (P, K)
        coef = (max_norm / (torch.linalg.vector_norm(norms, dim=0) + 1e-6)).clamp(max=1.0)
        for g in grads:
            g.mul_(coef.view(-1, *([1] * (g.dim() - 1))))

    @torch.no_grad()
    def _grad_norm_penalty(self, alpha: float, eps: float) -> None:
        """``grad_norm_penalty_fd`` per member: ``h_k = eps / ||g_k||`` from member k's own gradient norm;
        floating buffers (BN running statistics) touched by the extra pass are restored, as there."""
        params = list(self.params.values())
        g = [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in params]
        gnorm = torch.sqrt(sum((gi.double() ** 2).flatten(1).sum(1) for gi in g))  # (K,)
        live = gnorm > 0
        h = torch.where(live, eps / gnorm, torch.ones_like(gnorm)).float()
        saved = {n: b.clone() for n, b in self.buffers.items() if b.is_floating_point()}
        p0 = [p.clone() for p in params]
        shape = lambda t: (-1, *([1] * (t.dim() - 1)))  # noqa: E731 - (K,) against a stacked tensor
        for p, gi in zip(params, g):
            p.add_(gi * h.view(shape(p)))
        with torch.enable_grad():
            self._full_gradient(None)
        for p, gi, old in zip(params, g, p0):
            p.copy_(old)
            hg = (p.grad - gi) / h.view(shape(p)) if p.grad is not None else torch.zeros_like(gi)
            p.grad = torch.where(live.view(shape(p)), gi + alpha * hg, gi)
        for n, b in saved.items():
            self.buffers[n].copy_(b)

    def full_batch_epoch(self, epoch: int) -> dict[str, Tensor]:
        """One optimizer step from each member's exact full-batch gradient (``FullBatchLoop.step``):
        the divergence guard reads the gradient after clipping, as the plain guard's
        ``on_before_optimizer_step`` does; train/loss and train/acc are those before the step."""
        correct = torch.zeros(self.k, device=self.device, dtype=torch.long)
        losses = self._full_gradient(correct)
        if self.full_batch.grad_norm_penalty:
            self._grad_norm_penalty(float(self.full_batch.grad_norm_penalty), float(self.full_batch.grad_penalty_eps))
        if self.full_batch.clip_grad_norm:
            self._clip_per_member(float(self.full_batch.clip_grad_norm))
        self.guard.before_step(epoch, self.params.values())
        self._member_grads()
        self.optimizer.step()  # elementwise optimizers call a closure once: same as stepping after it
        with torch.no_grad():
            self.guard.after_step(epoch + 1, losses)
        self.guard.end_epoch()
        if self.scheduler is not None:
            self.scheduler.step()
        return {"train/loss": losses, "train/acc": correct.float() / self.n_train}

    @torch.no_grad()
    def evaluate(self, split: str) -> dict[str, Tensor]:
        """val/loss, val/acc, val/loss_se per member (K,) on each member's own split."""
        xs = torch.stack([getattr(m.dm, f"{split}_set").x for m in self.members]).to(self.device)
        ys = torch.stack([getattr(m.dm, f"{split}_set").y for m in self.members]).to(self.device)
        per = []
        correct = torch.zeros(self.k, dtype=torch.long, device=self.device)
        for s in range(0, xs.shape[1], self.eval_batch_size):
            x, y = xs[:, s:s + self.eval_batch_size], ys[:, s:s + self.eval_batch_size]
            logits = self.predict(x)
            per.append(F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none").view(y.shape))
            correct += (logits.argmax(-1) == y).sum(dim=1)
        losses = torch.cat(per, dim=1)
        n = losses.shape[1]
        return {f"{split}/loss": losses.mean(dim=1), f"{split}/acc": correct.float() / n,
                f"{split}/loss_se": losses.std(dim=1) / n ** 0.5}

    def fit(self, on_epoch_end: Callable[[int, int, bool], None] | None = None,
            signalled: Callable[[], str | None] | None = None) -> None:
        """Train all members for ``max_epochs``, recording each member's history; a member that diverges
        stops being recorded at that step (its plain run would end there), one whose early-stopping rule
        fires stops after that epoch with its rule's best weights restored; both freeze. The group ends when
        every member stopped. ``on_epoch_end(i, epoch, improved)`` runs for every member still training (it
        writes the member's checkpoints). ``signalled()`` names a received SIGINT/SIGTERM (``interrupted`` /
        ``preempted``): the group stops at the end of that epoch, after every member's ``last.ckpt`` is
        written (a plain run stops at the next step with ``interrupted.ckpt``; a stacked group stops at the
        epoch boundary)."""
        for epoch in range(self.max_epochs):
            status = signalled() if signalled is not None else None
            if status and epoch > 0:
                for i, m in enumerate(self.members):
                    if self.active[i]:
                        m.status, m.stopped_step = status, epoch * self.batches
                        m.stop_reason = f"{status} after epoch {epoch - 1} (a stacked group stops at epoch ends)"
                break
            if not any(self.active):
                break
            train = self.train_epoch(epoch)
            for i, why in self.guard.newly_diverged(epoch):
                if self.active[i]:
                    m = self.members[i]
                    m.status, m.stop_reason, m.stopped_step = "diverged", why, self.guard.step_of(i)
                    self.active[i] = False
            val = self.evaluate("val")
            self.dropout.loader_draw()  # the plain run's validation loader draw
            rows = {i: {"epoch": epoch, **{k: float(v[i]) for k, v in {**val, **train}.items()}}
                    for i in range(self.k) if self.active[i]}
            stops = {i: self.callbacks[i].early_stop(epoch, rows[i]) for i in rows}
            measure_memorization(self, rows, epoch, (epoch + 1) * self.batches)
            for i, row in rows.items():
                m = self.members[i]
                m.history.append(row)
                score = val["val/acc"][i].detach().cpu()
                # ModelCheckpoint(monitor=val/acc, mode=max): strictly better replaces the best
                improved = m.best_score is None or bool(score > m.best_score)
                if improved:
                    m.best_score, m.best_epoch = score.clone(), epoch
                if on_epoch_end is not None:
                    on_epoch_end(i, epoch, improved)
                if stops[i]:
                    self.active[i] = False
                    self.callbacks[i].end_training()  # the rule's best weights, as the plain run's on_train_end
        for i, m in enumerate(self.members):
            if self.active[i] and m.status == "completed":
                self.callbacks[i].end_training()
