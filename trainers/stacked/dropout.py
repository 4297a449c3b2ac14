"""Dropout and noisy BatchNorm in a stacked group: member k draws exactly the masks and noise its plain run
draws (on a CPU).

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

``norm=noisy_bn`` draws its noise from the same global generator inside every train-mode forward
(``noise_draws``: two per-channel ``rand`` and a ``rand`` and ``randn`` of the activation's shape); the
template's layers become :class:`GivenNoiseBN`, which apply a given ``(s, m)``, and member k draws them
with its generator interleaved with its dropout masks in the order the plain forward calls the layers
(recorded by forward pre-hooks in the dry run), so the two kinds of draws interleave as in the plain run.

On CUDA a plain run's dropout is a fused Philox kernel whose draws cannot be reproduced from outside:
there each member gets its own CUDA generator seeded with its seed (independent streams, not its plain
run's masks); noisy BN members draw from those generators too.

Checkpoints: a plain run's ``RunContract`` state holds the global RNG state as it was at the epoch's end,
and a plain run resumed from it restores it at the next epoch's start (replaying the epoch's loader draw);
:meth:`MemberDropout.states` writes member k's generator state in that form, so a plain run resumed from a member's checkpoint continues the member's dropout stream.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from shiftlab.trainers.norms.noisy_bn import NoisyBatchNorm, noise_draws


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


class GivenNoiseBN(NoisyBatchNorm):
    """:class:`NoisyBatchNorm` (template only) whose noise ``s * a + m`` is given as the buffers
    ``noise_s`` / ``noise_m``; train mode without them records the activation's shape and applies none
    (the dry run). Same parameters and buffers as the layer it stands in for."""

    def __init__(self, layer: NoisyBatchNorm) -> None:
        super().__init__(layer.num_features, n_mu=layer.n_mu, n_sigma=layer.n_sigma, r_mu=layer.r_mu,
                         r_sigma=layer.r_sigma, noise_position=layer.noise_position, eps=layer.eps,
                         momentum=layer.momentum, affine=layer.affine,
                         track_running_stats=layer.track_running_stats, sync=layer.sync)
        self.register_buffer("noise_s", None, persistent=False)
        self.register_buffer("noise_m", None, persistent=False)
        self.seen: tuple[torch.Size, torch.dtype] | None = None

    def _noise(self, a: Tensor) -> Tensor:
        if self.noise_s is None:
            self.seen = (a.shape, a.dtype)
            return a
        return self.noise_s * a + self.noise_m


def draw_mask(shape: torch.Size, p: float, generator: torch.Generator, device: torch.device,
              out: Tensor | None = None) -> Tensor:
    """The noise ATen's CPU dropout multiplies by, drawn from ``generator`` (p == 1: zeros, no draw), into
    ``out`` (a contiguous slice of the stacked masks: the same kernel on the same shape) when given."""
    out = torch.empty(shape, device=device) if out is None else out
    if p >= 1:
        return out.zero_()
    return out.bernoulli_(1 - p, generator=generator).div_(1 - p)


class MemberDropout:
    """Per-member generators of a stacked group for its dropout and noisy-BN layers, and the masks and noise
    of each training forward. A group without such layers draws nothing (every method is then a no-op)."""

    def __init__(self, template: nn.Module, members: list[Any], device: torch.device) -> None:
        self.device = device
        self.layers: list[tuple[str, MaskedDropout | GivenNoiseBN]] = []
        for name, mod in list(template.named_modules()):
            if isinstance(mod, nn.Dropout):
                given: nn.Module = MaskedDropout(float(mod.p))
            elif isinstance(mod, NoisyBatchNorm):
                given = GivenNoiseBN(mod).to("meta").train(mod.training)
            else:
                continue
            parent, _, leaf = name.rpartition(".")
            setattr(template.get_submodule(parent), leaf, given)
            self.layers.append((name, given))
        self.template = template
        self.cpu: list[torch.Generator] = []  # the plain runs' global CPU generators (loader draws, CPU masks)
        self.cuda: list[torch.Generator] | None = None  # CUDA: independent streams (see the module docstring)
        if self.layers:
            self.cpu = [torch.Generator().set_state(m.rng_state) for m in members]
            if device.type != "cpu":
                self.cuda = [torch.Generator(device).manual_seed(int(m.cfg.seed)) for m in members]
        self._plans: dict[torch.Size, list[tuple[str, nn.Module, torch.Size, torch.dtype]]] = {}

    def _plan(self, sample: torch.Size) -> list[tuple[str, nn.Module, torch.Size, torch.dtype]]:
        """``(name, layer, input shape, dtype)`` of each random layer in the order one member's forward of an
        input of shape ``sample`` calls them (a meta dry run)."""
        if sample not in self._plans:
            order: list[int] = []
            hooks = [m.register_forward_pre_hook(lambda *_, j=j: order.append(j))
                     for j, (_, m) in enumerate(self.layers)]
            # every other layer in eval mode: a train-mode BN variant may read a tensor's value (ghost_bn's
            # chunk count, batch_renorm's batch count), which a meta tensor does not have; shapes are the same
            random = {id(m) for _, m in self.layers}
            others = [m for m in self.template.modules() if id(m) not in random and m.training]
            for m in others:
                m.training = False
            try:
                with torch.no_grad():
                    self.template(torch.empty(sample, device="meta"))
            finally:
                for h in hooks:
                    h.remove()
                for m in others:
                    m.training = True
            plan = []
            for j in order:
                name, m = self.layers[j]
                shape, dtype = (m.seen, torch.float32) if isinstance(m, MaskedDropout) else m.seen
                plan.append((name, m, shape, dtype))
            self._plans[sample] = plan
        return self._plans[sample]

    def with_masks(self, buffers: dict[str, Tensor], x: Tensor) -> dict[str, Tensor]:
        """``buffers`` plus every member's masks and noise for one train-mode forward of ``x`` (K, b, ...),
        drawn in the plain forward's call order: ``{"<dropout>.mask": (K, *shape), "<noisy bn>.noise_s":
        (K, *shape), "<noisy bn>.noise_m": ...}``."""
        if not self.layers:
            return buffers
        plan = self._plan(x.shape[1:])
        gens, where = (self.cuda, self.device) if self.cuda is not None else (self.cpu, torch.device("cpu"))
        out: dict[str, Tensor] = {}
        for name, m, shape, dtype in plan:
            keys = ("mask",) if isinstance(m, MaskedDropout) else ("noise_s", "noise_m")
            out.update({f"{name}.{key}": torch.empty((len(gens), *shape), device=where, dtype=dtype) for key in keys})
        for k, g in enumerate(gens):  # member k's draws in its plain forward's call order
            for name, m, shape, dtype in plan:
                if isinstance(m, MaskedDropout):
                    draw_mask(shape, m.p, g, where, out=out[f"{name}.mask"][k])
                else:
                    s_k, m_k = noise_draws(shape, m.n_mu, m.n_sigma, m.r_mu, m.r_sigma, g, dtype, where)
                    out[f"{name}.noise_s"][k], out[f"{name}.noise_m"][k] = s_k, m_k
        return {**buffers, **{key: t.to(self.device) for key, t in out.items()}}

    def loader_draw(self) -> None:
        """A DataLoader iterator's ``_base_seed`` draw from each member's global generator."""
        for g in self.cpu:
            torch.empty((), dtype=torch.int64).random_(generator=g)

    def states(self, i: int) -> dict[str, Any]:
        """Member ``i``'s ``RunContract`` checkpoint state (its plain run's global RNG state now), keyed by
        that callback's ``state_key``; empty without dropout or noisy BN."""
        if not self.layers:
            return {}
        state: dict[str, Any] = {"torch_rng": self.cpu[i].get_state()}
        if self.cuda is not None:
            state["cuda_rng"] = [self.cuda[i].get_state()]
        return {"RunContract": state}
