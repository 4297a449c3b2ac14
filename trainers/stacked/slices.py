"""Each member's slice of a stacked group's state (weights, buffers, optimizer state, scheduler view), and
keeping a stopped member's slices still while the others train.

Why a mixin of :class:`~shiftlab.trainers.stacked.engine.StackedGroup`: these read and write the group's
stacked tensors (``params``, ``buffers``, ``optimizer``, ``slices``, ``active``, ``shared``) member by
member; the engine module keeps the training loop.
"""
from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor


def same_settings(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether two param groups' settings are equal (values may be numbers, tuples, tensors or None)."""
    if a.keys() != b.keys():
        return False
    for k in a:
        x, y = a[k], b[k]
        if torch.is_tensor(x) or torch.is_tensor(y):
            if not (torch.is_tensor(x) and torch.is_tensor(y) and torch.equal(x, y)):
                return False
        elif x != y:
            return False
    return True


class MemberSlices:
    """Member-wise views of the stacked state; mixed into ``StackedGroup``."""

    def train_epoch(self, epoch: int) -> dict[str, Tensor]:
        """One training epoch (``_train_epoch``), after which each stopped member's slices are what they were
        at its stop: its parameters and, with one shared param group, its optimizer state (a per-member group
        got no gradient and was skipped), and its buffers (BatchNorm running statistics and batch count,
        which every train-mode forward updates for all members), as its plain run ended there. Once per
        epoch suffices: members do not read each other's slices, and nothing reads a stopped member's before
        the epoch ends."""
        frozen = [i for i in range(self.k) if not self.active[i]]
        if not frozen:
            return self._train_epoch(epoch)
        idx = torch.tensor(frozen, device=self.device)
        params = [self.params[n] for n in self.names]
        state = [v for p in params for v in self.optimizer.state.get(p, {}).values()
                 if torch.is_tensor(v) and v.shape == p.shape] if self.shared else []
        with torch.no_grad():
            kept = [(t, t[idx].clone()) for t in (*params, *state, *self.buffers.values())]
        out = self._train_epoch(epoch)
        with torch.no_grad():
            for t, v in kept:
                t[idx] = v
        return out

    def _member_grads(self) -> None:
        """Each member's slices get their slice of the stacked gradient; a stopped member's get none, so the
        optimizer leaves them (and their state) alone. One shared group reads the stacked gradients
        themselves (a stopped member's slices are restored by :meth:`train_epoch`)."""
        if self.shared:
            return
        grads = {n: p.grad for n, p in self.params.items()}
        for i, sl in enumerate(self.slices):
            for n, p in sl.items():
                p.grad = grads[n][i] if self.active[i] else None

    def member_weights(self, i: int) -> dict[str, Tensor]:
        """Member ``i``'s parameters and buffers under the plain model's names (on the CPU)."""
        out = {n: p[i].detach().cpu().clone() for n, p in self.params.items()}
        out.update({n: b[i].detach().cpu().clone() for n, b in self.buffers.items()})
        return out

    @torch.no_grad()
    def load_member_weights(self, i: int, weights: dict[str, Tensor]) -> None:
        """Put ``weights`` (plain model names) into member ``i``'s parameter and buffer slices."""
        for n, v in weights.items():
            target = self.slices[i][n] if n in self.slices[i] else self.buffers[n][i]
            target.copy_(v.to(target.device))

    def member_optimizer_state(self, i: int) -> dict[str, Any]:
        """Member ``i``'s param group and state, in the plain optimizer's ``state_dict`` form (read while
        the member trains: a shared group's step counts are every active member's)."""
        sd = self.optimizer.state_dict()
        n = len(self.names)
        if self.shared:
            shapes = [self.params[name].shape for name in self.names]
            state = {j: {k: (v[i] if v.shape == shapes[j] else v).detach().cpu().clone() if torch.is_tensor(v)
                         else copy.deepcopy(v) for k, v in sd["state"][j].items()}
                     for j in range(n) if j in sd["state"]}
            group = copy.deepcopy(sd["param_groups"][0])
            group["params"] = list(range(n))
            return {"state": state, "param_groups": [group]}
        state = {j: {k: (v.detach().cpu().clone() if torch.is_tensor(v) else v) for k, v in sd["state"][i * n + j].items()}
                 for j in range(n) if i * n + j in sd["state"]}
        group = copy.deepcopy(sd["param_groups"][i])
        group["params"] = list(range(n))
        return {"state": state, "param_groups": [group]}

    def member_scheduler_state(self, i: int) -> dict[str, Any] | None:
        """Member ``i``'s view of the scheduler (its group's base and last rate), as a plain run's."""
        if self.scheduler is None:
            return None
        sd = self.scheduler.state_dict()
        return {k: ([v[i]] if isinstance(v, list) and len(v) == self.k else copy.deepcopy(v)) for k, v in sd.items()}
