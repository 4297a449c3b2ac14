"""Stop a diverging run cleanly, before the blow-up reaches NaN or a checkpoint.

Why more than a NaN test: Adam at lr=1e6 "completes" with weights near 1e30 and a finite loss, and
SGD at lr=1e6 produces an infinite gradient one step before the loss turns NaN. Two cheap signals
catch both early: the training loss against a multiple of its first-epoch value, and the
gradient norm's finiteness before the optimizer applies it.
"""
from __future__ import annotations

import math

import lightning as L
import torch

from shiftlab.trainers.checkpoint_io import epoch_checkpoint
from shiftlab.callbacks.reporting import Reporter


class DivergenceError(RuntimeError):
    """Raised to end a run whose training diverged; the message names the checkpoint kept."""


def blew_up(loss: float, reference: float | None, max_loss_ratio: float | None) -> str | None:
    """Why ``loss`` counts as divergence (None if it does not).

    ``reference`` is the first epoch's mean training loss (the first step's loss while the first
    epoch runs); a loss above ``max_loss_ratio`` times it is a blow-up.
    """
    if not math.isfinite(loss):
        return f"training loss became {loss}"
    if max_loss_ratio and reference is not None and reference > 0 and loss > max_loss_ratio * reference:
        return f"training loss {loss:.4g} exceeded {max_loss_ratio:g} x its first-epoch value {reference:.4g}"
    return None


def grad_norm(parameters) -> torch.Tensor:
    """The global 2-norm of the gradients (one device tensor; no host sync).

    Why ``get_total_norm``: it takes the per-tensor norms in one fused (foreach) call; a Python
    loop of ``vector_norm`` calls cost about as much as a small model's optimizer step.
    """
    # half-precision gradients in float32: a finite fp16 norm above 65504 must not read as inf
    grads = [g if g.dtype in (torch.float32, torch.float64) else g.float()
             for g in (p.grad.detach() for p in parameters if p.grad is not None)]
    if not grads:
        return torch.zeros(())
    return torch.nn.utils.get_total_norm(grads, norm_type=2.0).float()


class StepGradNorm:
    """:func:`grad_norm` of one optimizer's parameters, every step, at less Python cost.

    Why: the guard checks every step, and on the digits MLP (a ~1 ms step) the generic path (walk the
    param groups, filter and convert the gradients, group them by device and dtype) took ~0.1 ms a step.
    The parameter list and whether every tensor is a float32 tensor on one device are read once per
    optimizer; such gradients take the same two reductions as ``get_total_norm`` (the per-tensor norms
    in one foreach call, then the norm of those), so the value is the same; anything else takes
    :func:`grad_norm`.
    """

    def __init__(self) -> None:
        self._key: tuple[int, int] | None = None
        self._params: list[torch.Tensor] = []
        self._uniform = False

    def __call__(self, optimizer) -> torch.Tensor:
        inner = getattr(optimizer, "optimizer", optimizer)
        key = (id(inner), sum(len(g["params"]) for g in inner.param_groups))
        if key != self._key:
            self._key, self._params = key, optimizer_parameters(inner)
            self._uniform = (len({(p.device, p.dtype) for p in self._params}) == 1
                             and self._params[0].dtype == torch.float32)
        grads = [p.grad for p in self._params if p.grad is not None]
        if not self._uniform or not grads or any(g.dtype != torch.float32 for g in grads):
            return grad_norm(self._params)
        return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))


def optimizer_parameters(optimizer) -> list[torch.Tensor]:
    """The tensors ``optimizer`` updates (a Lightning-wrapped optimizer is unwrapped)."""
    inner = getattr(optimizer, "optimizer", optimizer)
    return [p for group in inner.param_groups for p in group["params"]]


def kept_checkpoint(trainer: L.Trainer) -> str:
    """Which checkpoint really exists to restart from, said in words."""
    path = epoch_checkpoint(trainer, ("last.ckpt", "best.ckpt"))
    if path is None:
        return "no checkpoint was written (it diverged before the first epoch ended)"
    return f"{path} kept (end of the last finished epoch)" if path.name == "last.ckpt" else f"{path} kept"


class DivergenceGuard(L.Callback, Reporter):
    """Ends a run whose training diverges, before it can overwrite a good checkpoint.

    Raising (rather than setting ``trainer.should_stop``) ends the run before the epoch's
    validation and checkpoint hooks. All DDP ranks take the same decision.

    Args:
        max_loss_ratio: divergence when the training loss exceeds this multiple of its first-epoch
            mean (null: only non-finite values count).
        check_grad_norm: also stop when the gradient norm is not finite (checked before the
            optimizer step, so the weights stay finite).
        check_every: check every this many training batches (each check reads one number from the
            device).
    """

    def __init__(self, max_loss_ratio: float | None = 100.0, check_grad_norm: bool = True,
                 check_every: int = 1) -> None:
        self.max_loss_ratio = max_loss_ratio
        self.check_grad_norm = check_grad_norm
        self.check_every = max(1, int(check_every))
        self.reference: float | None = None
        self._epoch_sum, self._epoch_n = 0.0, 0
        self._first: float | None = None
        self.stop_reason: str | None = None
        self._group: list | None = None  # the module's step_losses being checked, and how many of them were
        self._checked = 0
        self._grad_norm = StepGradNorm()

    def _decide(self, trainer: L.Trainer, why: str | None) -> None:
        bad = why is not None
        if trainer.world_size > 1:
            bad = trainer.strategy.reduce_boolean_decision(bad, all=False)
        if bad:
            why = why or "another rank diverged"
            self.stop_reason = (f"diverged: {why} at epoch {trainer.current_epoch}, step {trainer.global_step}; "
                                f"{kept_checkpoint(trainer)}")
            raise DivergenceError(self.stop_reason)

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer) -> None:
        self._check_group(trainer, pl_module, but_last=True)
        if not self.check_grad_norm or trainer.global_step % self.check_every:
            return
        # The optimizer's own parameters: the ones whose update the check guards; walking
        # ``pl_module.parameters()`` visits every submodule (metrics included) each step.
        norm = float(self._grad_norm(optimizer))
        self._decide(trainer, None if math.isfinite(norm) else f"gradient norm became {norm}")

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        if getattr(pl_module, "step_losses", None) is not None:
            self._check_group(trainer, pl_module, but_last=False)
        else:
            self._check_loss(trainer, batch_idx, getattr(pl_module, "last_loss", None))

    def _check_group(self, trainer: L.Trainer, pl_module: L.LightningModule, but_last: bool) -> None:
        """``module.steps_per_call > 1`` (one call, several steps): each step's loss, by its batch index
        in the epoch, once; a step's before the next update, so a run stops after the step N = 1 stops."""
        steps = getattr(pl_module, "step_losses", None)
        if steps is None:
            return
        if steps is not self._group:
            self._group, self._checked = steps, 0
        for index, loss in steps[self._checked:len(steps) - but_last]:
            self._checked += 1
            self._check_loss(trainer, index, loss)

    def _check_loss(self, trainer: L.Trainer, batch_idx: int, loss) -> None:
        if batch_idx % self.check_every:
            return
        if loss is None:
            return
        value = float(loss.detach().float().cpu()) if isinstance(loss, torch.Tensor) else float(loss)
        if self.reference is None and math.isfinite(value):
            self._first = value if self._first is None else self._first
            self._epoch_sum, self._epoch_n = self._epoch_sum + value, self._epoch_n + 1
        # During the first epoch the first step's loss is the yardstick (a running mean would
        # follow the blow-up upwards).
        reference = self.reference if self.reference is not None else self._first
        self._decide(trainer, blew_up(value, reference, self.max_loss_ratio))

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.reference is None and self._epoch_n:
            self.reference = self._epoch_sum / self._epoch_n

    def state_dict(self) -> dict:
        return {"reference": self.reference, "epoch_sum": self._epoch_sum, "epoch_n": self._epoch_n,
                "first": self._first}

    def load_state_dict(self, state_dict: dict) -> None:
        self.reference = state_dict.get("reference")
        self._epoch_sum = float(state_dict.get("epoch_sum", 0.0))
        self._epoch_n = int(state_dict.get("epoch_n", 0))
        self._first = state_dict.get("first")
