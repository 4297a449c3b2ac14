"""Dropout in a stacked group: member k draws exactly the masks its plain run draws (on a CPU).

Why this reproduces a plain run: ATen's CPU dropout is ``noise = empty_like(x).bernoulli_(1 - p);
noise.div_(1 - p); x * noise`` drawn from torch's global CPU generator (``tests/test_stacked_dropout.py``
checks it against ``nn.Dropout`` bit for bit). A plain run's global generator, after ``seed_everything``,
the data module and the model are built, is advanced only by (measured, same test file) one int64 draw
each time a DataLoader iterator is made (its ``_base_seed``): once before the first epoch's training
(Lightning's sanity validation / the first train iterator), once at the start of every later epoch (the
new train iterator) and once at every validation; and by the dropout masks of the training forwards. So
member k holds a ``torch.Generator`` with its plain run's state after its model was built, makes the same
draws at the same points (:meth:`MemberDropout.loader_draw`), and draws its masks with its generator in
the plain forward's layer order and shapes; the masks enter ``vmap`` as batched "buffers" of the
template's :class:`MaskedDropout` modules. ``nn.Dropout`` has no state: the state_dict keys stay the
plain model's.

On CUDA a plain run's dropout is a fused Philox kernel whose draws cannot be reproduced from outside:
there each member gets its own CUDA generator seeded with its seed (independent streams, not its plain
run's masks).

Checkpoints: a plain run's ``RunContract`` state holds the global RNG state as it was at the epoch's end,
and a plain run resumed from it restores it at the next epoch's start (replaying the epoch's loader draw);
:meth:`MemberDropout.states` writes member k's generator state in that form, so a plain run resumed from a member's checkpoint continues the member's dropout stream.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn


class MaskedDropout(nn.Module):
    """``nn.Dropout`` whose mask (already scaled by ``1 / (1 - p)``) is given as the buffer ``mask``.

    Train mode without a mask records the input shape instead (the dry run that finds the shapes);
    eval mode returns the input, as ``nn.Dropout`` does."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p
        self.register_buffer("mask", None, persistent=False)
        self.seen: torch.Size | None = None

    def forward(self, x: Tensor) -> Tensor:
        if not self.training:
            return x
        if self.mask is None:
            self.seen = x.shape
            return x
        return x * self.mask


def draw_mask(shape: torch.Size, p: float, generator: torch.Generator, device: torch.device,
              out: Tensor | None = None) -> Tensor:
    """The noise ATen's CPU dropout multiplies by, drawn from ``generator`` (p == 1: zeros, no draw), into
    ``out`` (a contiguous slice of the stacked masks: the same kernel on the same shape) when given."""
    out = torch.empty(shape, device=device) if out is None else out
    if p >= 1:
        return out.zero_()
    return out.bernoulli_(1 - p, generator=generator).div_(1 - p)


class MemberDropout:
    """Per-member dropout generators of a stacked group, and the masks of each training forward. A group
    without dropout layers draws nothing (every method is then a no-op)."""

    def __init__(self, template: nn.Module, members: list[Any], device: torch.device) -> None:
        self.device = device
        self.layers: list[tuple[str, MaskedDropout]] = []
        for name, mod in list(template.named_modules()):
            if isinstance(mod, nn.Dropout):
                parent, _, leaf = name.rpartition(".")
                masked = MaskedDropout(float(mod.p))
                setattr(template.get_submodule(parent), leaf, masked)
                self.layers.append((name, masked))
        self.template = template
        self.cpu: list[torch.Generator] = []  # the plain runs' global CPU generators (loader draws, CPU masks)
        self.cuda: list[torch.Generator] | None = None  # CUDA: independent streams (see the module docstring)
        if self.layers:
            self.cpu = [torch.Generator().set_state(m.rng_state) for m in members]
            if device.type != "cpu":
                self.cuda = [torch.Generator(device).manual_seed(int(m.cfg.seed)) for m in members]
        self._shapes: dict[torch.Size, list[torch.Size]] = {}

    def _layer_shapes(self, sample: torch.Size) -> list[torch.Size]:
        """Each dropout layer's input shape for one member's input of shape ``sample`` (a meta dry run)."""
        if sample not in self._shapes:
            with torch.no_grad():
                self.template(torch.empty(sample, device="meta"))
            self._shapes[sample] = [m.seen for _, m in self.layers]
        return self._shapes[sample]

    def with_masks(self, buffers: dict[str, Tensor], x: Tensor) -> dict[str, Tensor]:
        """``buffers`` plus every member's masks for one train-mode forward of ``x`` (K, b, ...), drawn in
        the plain forward's layer order: ``{"<layer>.mask": (K, *shape)}``."""
        if not self.layers:
            return buffers
        shapes = self._layer_shapes(x.shape[1:])
        gens, where = (self.cuda, self.device) if self.cuda is not None else (self.cpu, torch.device("cpu"))
        masks = [torch.empty((len(gens), *s), device=where) for s in shapes]
        for k, g in enumerate(gens):  # member k's draws in its plain forward's layer order
            for out, (_, m) in zip(masks, self.layers):
                draw_mask(out.shape[1:], m.p, g, where, out=out[k])
        return {**buffers, **{f"{name}.mask": t.to(self.device) for (name, _), t in zip(self.layers, masks)}}

    def loader_draw(self) -> None:
        """A DataLoader iterator's ``_base_seed`` draw from each member's global generator."""
        for g in self.cpu:
            torch.empty((), dtype=torch.int64).random_(generator=g)

    def states(self, i: int) -> dict[str, Any]:
        """Member ``i``'s ``RunContract`` checkpoint state (its plain run's global RNG state now), keyed by
        that callback's ``state_key``; empty without dropout."""
        if not self.layers:
            return {}
        state: dict[str, Any] = {"torch_rng": self.cpu[i].get_state()}
        if self.cuda is not None:
            state["cuda_rng"] = [self.cuda[i].get_state()]
        return {"RunContract": state}
