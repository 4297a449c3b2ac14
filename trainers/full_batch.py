"""Everything ``batching=full`` does: exact full-batch gradients accumulated in chunks, summed over
DDP ranks, with Geiping et al.'s fixes (clipping, gradient-norm penalty), and the one optimizer
step per epoch that the task modules delegate to (:class:`FullBatchLoop`).

Why chunks: the whole training set rarely fits through the model at once. Each chunk contributes
``sum(per-unit loss) / n_total`` to the objective (units: samples, or tokens for sequence models),
so the accumulated gradient equals the gradient of the mean loss over all units whatever the
chunking (an uneven last chunk included). Every rank walks its own shard ``x[rank::world]`` and
divides by the *global* count; the gradients are then summed over ranks.

What is outside this file: the :class:`~shiftlab.trainers.batching.FullBatch` config values, and
the data module's one-item train loader (``dm.full_batch``) that makes Lightning call the step
once per epoch.
"""
from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any, Callable

import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F
from torch.nn.parallel import DistributedDataParallel

from shiftlab.trainers.batching import FullBatch

if TYPE_CHECKING:  # the base module imports this file
    from shiftlab.trainers.modules.base import TaskModule

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
# (x chunk, y chunk) -> (sum of the chunk's per-unit losses / n_total, output for metrics)
ChunkLoss = Callable[[torch.Tensor, torch.Tensor], "tuple[torch.Tensor, Any]"]


def as_model_input(model: nn.Module, x: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """``x`` on ``device`` in the dtype of ``model``'s floating parameters when ``x`` is floating.

    Why: Lightning converts the batches it hands to ``training_step`` for ``precision=64-true``
    (the model is float64), but tensors read straight from the data module stay float32; integer
    inputs (symbol ids) are left alone.
    """
    if x.is_floating_point():
        dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), x.dtype)
        return x.to(device, dtype=dtype, non_blocking=True)
    return x.to(device, non_blocking=True)


def per_sample_cross_entropy(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, y, reduction="none")


def accumulate_chunks(model: nn.Module, chunk_loss: ChunkLoss, x: torch.Tensor, y: torch.Tensor,
                      chunk_size: int, device: torch.device | str,
                      on_chunk: Callable[[torch.Tensor, torch.Tensor, Any], None] | None = None) -> torch.Tensor:
    """Backpropagate ``chunk_loss`` over ``(x, y)`` in chunks, adding into ``p.grad``.

    Returns the (detached) sum of the chunk losses. ``on_chunk(x, y, output)`` lets the caller
    update metrics from the same forward pass.
    """
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    total = torch.zeros((), device=device, dtype=dtype)  # float64 under precision=64-true
    for start in range(0, x.shape[0], chunk_size):
        xb = as_model_input(model, x[start:start + chunk_size], device)
        yb = y[start:start + chunk_size].to(device, non_blocking=True)
        loss, output = chunk_loss(xb, yb)
        loss.backward()
        total += loss.detach()
        if on_chunk is not None:
            on_chunk(xb, yb, output)
    return total


def accumulate_full_gradient(model: nn.Module, x: torch.Tensor, y: torch.Tensor, chunk_size: int,
                             n_total: int, device: torch.device | str,
                             loss_fn: LossFn = per_sample_cross_entropy,
                             on_chunk: Callable[[torch.Tensor, torch.Tensor], None] | None = None
                             ) -> torch.Tensor:
    """Add d/dθ [sum of per-sample ``loss_fn(model(x), y)`` / n_total] into ``p.grad``.

    Returns the (detached) partial mean loss ``sum(loss) / n_total`` for these samples.
    ``on_chunk(output, y)`` sees each chunk's detached model output.
    """
    def chunk_loss(xb: torch.Tensor, yb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = model(xb)
        return loss_fn(out, yb).sum() / n_total, out

    hook = None if on_chunk is None else (lambda xb, yb, out: on_chunk(out.detach(), yb))
    return accumulate_chunks(model, chunk_loss, x, y, chunk_size, device, hook)


def all_reduce_gradients(params: list[torch.Tensor]) -> None:
    """Sum gradients over ranks (each rank already divided by the global unit count)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def grad_norm_penalty_fd(params: list[torch.Tensor], recompute_grad: Callable[[], None], alpha: float,
                         eps: float = 0.01, buffers: list[torch.Tensor] | None = None) -> float:
    """Add the gradient of ``(alpha / 2) * ||grad L||^2`` to ``p.grad`` by a finite difference.

    That gradient is ``alpha * H g`` with ``g = grad L``; ``H g`` is approximated as
    ``(grad L(θ + h g) - g) / h`` with ``h = eps / ||g||`` (Geiping et al. 2022), which costs one
    extra gradient evaluation instead of double backpropagation. ``recompute_grad`` must zero the
    gradients and refill ``p.grad`` with grad L at the current parameters. Buffers (e.g. BN
    running statistics) touched by the extra pass are restored. Returns ``||g||``.
    """
    g = [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for p in params]
    gnorm = torch.sqrt(sum((gi.double() ** 2).sum() for gi in g)).item()
    if alpha == 0 or gnorm == 0.0:
        return gnorm
    h = eps / gnorm
    saved_buffers = [b.detach().clone() for b in buffers] if buffers else []
    saved_params = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p, gi in zip(params, g):
            p.add_(gi, alpha=h)
    recompute_grad()
    with torch.no_grad():
        for p, gi, p0 in zip(params, g, saved_params):
            p.copy_(p0)
            hg = (p.grad - gi) / h if p.grad is not None else torch.zeros_like(gi)
            p.grad = gi + alpha * hg
        for b, saved in zip(buffers or [], saved_buffers):
            b.copy_(saved)
    return gnorm


def has_batch_statistics(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


class FullBatchLoop:
    """The full-batch side of a :class:`~shiftlab.trainers.modules.base.TaskModule` (manual
    optimization): one closure-based optimizer step per epoch (so L-BFGS works), the epoch-wise
    scheduler step, and the DDP set-up. The task supplies only its chunk loss
    (``module.loss(x, y, total)``), its unit count and its accuracy update."""

    def __init__(self, batching: FullBatch) -> None:
        self.batching = batching

    def on_fit_start(self, module: TaskModule) -> None:
        if has_batch_statistics(module.model):
            warnings.warn("batching=full with BatchNorm: each chunk of batching.chunk_size samples is "
                          "normalized with its own statistics (ghost-batch semantics), so the full-batch "
                          "gradient depends on the chunk size", stacklevel=1)
        if isinstance(module.trainer.strategy.model, DistributedDataParallel):
            # the steps reduce gradients themselves (weighted by the global unit count)
            module.trainer.strategy.model.require_backward_grad_sync = False

    def gradient(self, module: TaskModule, params: list[torch.Tensor], record: bool) -> torch.Tensor:
        """Gradient of the mean loss over the whole training set into ``p.grad`` (this rank's
        shard, summed over ranks); returns that loss. ``record``: update the train accuracy."""
        trainer = module.trainer
        data = trainer.datamodule.train_set
        world, rank = trainer.world_size, trainer.global_rank
        x, y = (data.x[rank::world], data.y[rank::world]) if world > 1 else (data.x, data.y)
        n_total = module.count_units(data.x)
        for p in params:
            p.grad = None

        def on_chunk(xb: torch.Tensor, yb: torch.Tensor, output: Any) -> None:
            if record and module.track_train_acc:
                module.update_accuracy(module.train_acc, xb, yb, output)

        def chunk_loss(xb: torch.Tensor, yb: torch.Tensor) -> tuple[torch.Tensor, Any]:
            out = module.loss(xb, yb, n_total)
            return out.value, out.output

        loss = accumulate_chunks(module.model, chunk_loss, x, y, self.batching.chunk_size, module.device, on_chunk)
        all_reduce_gradients(params)
        if world > 1:
            loss = trainer.strategy.reduce(loss, reduce_op="sum")
        return loss

    def step(self, module: TaskModule) -> torch.Tensor:
        """One optimizer step from the exact full-batch gradient; returns the loss before it."""
        opt = module.optimizers()
        params = [p for p in module.model.parameters() if p.requires_grad]
        buffers = [b for b in module.model.buffers() if b.is_floating_point()]
        b = self.batching
        first: list[torch.Tensor] = []

        def closure() -> torch.Tensor:
            record = not first
            loss = self.gradient(module, params, record)
            if b.grad_norm_penalty:
                grad_norm_penalty_fd(params, lambda: self.gradient(module, params, False), b.grad_norm_penalty,
                                     b.grad_penalty_eps, buffers)
            if b.clip_grad_norm:
                torch.nn.utils.clip_grad_norm_(params, b.clip_grad_norm)
            if record:
                first.append(loss)
            return loss

        opt.step(closure=closure)
        return first[0]

    def on_train_epoch_end(self, module: TaskModule) -> None:
        # manual optimization: Lightning does not step the (epoch-wise) scheduler itself
        sch = module.lr_schedulers()
        if sch is not None:
            sch.step()

