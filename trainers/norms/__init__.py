"""Normalization layers: one module per ``norm`` config option, each with a registered ``build``.

Adding a variant is one file in this package plus one yaml in ``configs/norm/``:

.. code-block:: python

    # trainers/norms/my_norm.py (or any module of yours listed in ``imports``)
    from shiftlab.trainers.norms import register_norm

    @register_norm("my_norm")
    def build(num_features: int, dims: int, **options) -> nn.Module: ...

.. code-block:: yaml

    # configs/norm/my_norm.yaml
    _target_: shiftlab.trainers.norms.my_norm.build
    _partial_: true        # the model supplies num_features and dims, once per layer
    eps: 1.0e-5

``dims`` is the number of spatial dimensions of the activation the layer normalizes:
0 for ``(N, C)``, 1 for ``(N, C, L)``, 2 for ``(N, C, H, W)``. A model never imports a norm class;
it receives the partial Hydra builds from ``configs/norm/*.yaml`` and calls ``norm(num_features,
dims)`` once per normalized layer. Capabilities are declared at registration:
``prepare_model=fn`` (rewrite the built model, e.g. weight standardization of the convs) and
``lightning_sync=True`` (torch's own BatchNorm layers, which ``trainer.sync_batchnorm`` may convert).
Every module in this package is imported on first use, so registration needs no edits elsewhere.
"""
from __future__ import annotations

import functools
import importlib
import pkgutil
from typing import Any, Callable

from torch import nn

from shiftlab.trainers.registry import Entry, Registry

NORMS: Registry[nn.Module] = Registry("norm", supplied=("num_features", "dims"),
                                      legacy_target="shiftlab.trainers.norms.NormFactory")
register_norm = NORMS.register
_loaded = False


def _load_all() -> None:
    global _loaded
    if _loaded:
        return
    for info in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{info.name}")
    _loaded = True


def norm_registry() -> Registry[nn.Module]:
    """:data:`NORMS` with every built-in variant registered."""
    _load_all()
    return NORMS


def create_norm_layer(name: str, num_features: int, dims: int, **kwargs: Any) -> nn.Module:
    """Build the normalization layer ``name`` for ``num_features`` channels."""
    return norm_registry().create(name, num_features, dims, **kwargs)


def norm_names() -> list[str]:
    return norm_registry().names()


def norm_entry(norm: Callable[..., nn.Module]) -> Entry[nn.Module] | None:
    """The registry entry behind a norm callable a model received (a ``functools.partial`` of a
    registered builder, as Hydra builds it), or None for an unregistered callable."""
    fn = norm.func if isinstance(norm, functools.partial) else norm
    return norm_registry().find(fn, norm.keywords if isinstance(norm, functools.partial) else None)


def prepare_model(norm: Callable[..., nn.Module], model: nn.Module) -> nn.Module:
    """Apply the norm's declared ``prepare_model`` capability to the built model, if it has one."""
    entry = norm_entry(norm)
    hook = entry.caps.get("prepare_model") if entry is not None else None
    return hook(model) if callable(hook) else model


def norm_builder(name: str, **kwargs: Any) -> Callable[[int, int], nn.Module]:
    """The norm callable ``(num_features, dims) -> layer`` a config's partial gives, by registry name (for code
    that picks a norm by name: benchmarks, tests)."""
    entry = norm_registry().entry(name)  # fails early, listing the known names
    return functools.partial(entry.builder, **{**entry.defaults, **kwargs})


def NormFactory(name: str, **kwargs: Any) -> Callable[[int, int], nn.Module]:  # noqa: N802 - old config target
    """The old config target (``NormFactory`` + ``name``), kept so saved configs still build (the
    config check warns): the same partial the new form builds."""
    return norm_builder(name, **kwargs)
