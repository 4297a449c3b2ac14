"""The divergence guard of a plain run (:class:`shiftlab.callbacks.divergence.DivergenceGuard`), per member.

Why on the device: the plain guard reads one number per step; here every member's first bad step is
recorded in device tensors and read once per epoch, so K members cost no more host syncs than one.
"""
from __future__ import annotations

import math
from typing import Iterable

import torch
from torch import Tensor

from shiftlab.callbacks.divergence import blew_up

LOSS, GRAD = 0, 1


class StackedGuard:
    """Records, per member, the first step where its loss or gradient norm counts as divergence."""

    def __init__(self, k: int, device: torch.device, max_loss_ratio: float | None = 100.0,
                 check_grad_norm: bool = True, check_every: int = 1) -> None:
        if int(check_every) != 1:
            raise ValueError("divergence.check_every must be 1 for stacked members")
        self.ratio, self.check_grad = max_loss_ratio, bool(check_grad_norm)
        self.bad_step = torch.full((k,), -1, dtype=torch.long, device=device)
        self.bad_kind = torch.zeros(k, dtype=torch.long, device=device)
        self.bad_value = torch.zeros(k, device=device)
        self.bad_ref = torch.full((k,), math.nan, device=device)  # the yardstick when it was marked
        self.first: Tensor | None = None  # first step's loss: the yardstick during the first epoch
        self.reference: Tensor | None = None  # first epoch's mean batch loss (unweighted, as the plain guard)
        self._sum, self._n = torch.zeros(k, device=device), 0
        self._reported: set[int] = set()

    def _mark(self, bad: Tensor, step: int, kind: int, value: Tensor, ref: Tensor | None = None) -> None:
        new = bad & (self.bad_step < 0)
        if ref is not None:
            self.bad_ref = torch.where(new, ref.float(), self.bad_ref)
        self.bad_step = torch.where(new, torch.full_like(self.bad_step, step), self.bad_step)
        self.bad_kind = torch.where(new, torch.full_like(self.bad_kind, kind), self.bad_kind)
        self.bad_value = torch.where(new, value.float(), self.bad_value)

    @torch.no_grad()
    def before_step(self, step: int, params: Iterable[Tensor]) -> None:
        """Gradient norm per member, before the optimizer applies it (the plain guard's order)."""
        if not self.check_grad:
            return
        norms = [torch.linalg.vector_norm(p.grad.detach().float().flatten(1), dim=1) for p in params
                 if p.grad is not None]
        norm = torch.linalg.vector_norm(torch.stack(norms), dim=0)
        self._mark(~torch.isfinite(norm), step, GRAD, norm)

    def after_step(self, step: int, losses: Tensor) -> None:
        if self.reference is None:
            if self.first is None:
                self.first = losses.clone()
            finite = torch.isfinite(losses)
            self._sum += torch.where(finite, losses, torch.zeros_like(losses))
            self._n += 1
        ref = self.reference if self.reference is not None else self.first
        bad = ~torch.isfinite(losses)
        if self.ratio:
            bad |= (ref > 0) & (losses > self.ratio * ref)
        self._mark(bad, step, LOSS, losses, ref)

    def end_epoch(self) -> None:
        if self.reference is None and self._n:
            self.reference = self._sum / self._n

    def state_dict(self, i: int) -> dict:
        """Member ``i``'s state in the plain DivergenceGuard's checkpoint form."""
        pick = lambda t: None if t is None else float(t[i])  # noqa: E731
        return {"reference": pick(self.reference), "epoch_sum": float(self._sum[i]), "epoch_n": self._n,
                "first": pick(self.first)}

    def step_of(self, i: int) -> int:
        return int(self.bad_step[i])

    def newly_diverged(self, epoch: int) -> list[tuple[int, str]]:
        """Members that diverged during ``epoch`` (one host sync), with the plain guard's reason."""
        steps, kinds, values = self.bad_step.tolist(), self.bad_kind.tolist(), self.bad_value.tolist()
        refs = self.bad_ref.tolist()
        out = []
        for i, (s, kind, v, r) in enumerate(zip(steps, kinds, values, refs)):
            if s < 0 or i in self._reported:
                continue
            self._reported.add(i)
            if kind == GRAD:
                why = f"gradient norm became {v}"
            else:
                why = blew_up(v, r if math.isfinite(r) else None, self.ratio) or f"training loss {v:.4g}"
            out.append((i, f"diverged: {why} at epoch {epoch}, step {s}"))
        return out
