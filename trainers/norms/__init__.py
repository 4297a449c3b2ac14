"""Normalization layers, chosen by name from the ``norm`` config group.

Adding a variant is one file in this package plus one yaml in ``configs/norm/``:

.. code-block:: python

    # trainers/norms/my_norm.py
    from shiftlab.trainers.norms import register_norm

    @register_norm("my_norm")
    def build(num_features: int, dims: int, **kwargs) -> nn.Module: ...

``dims`` is the number of spatial dimensions of the activation the layer normalizes:
0 for ``(N, C)``, 1 for ``(N, C, L)``, 2 for ``(N, C, H, W)``. Every module in this package is
imported on first use, so registration needs no edits elsewhere.

A model never imports a norm class; it receives a :class:`NormFactory` (built by Hydra from
``configs/norm/*.yaml``) and calls ``norm(num_features, dims)`` once per normalized layer.
"""
from __future__ import annotations

import importlib
import pkgutil
import sys
from typing import Any

from torch import nn

from shiftlab.trainers.registry import Registry

NORMS: Registry[nn.Module] = Registry("norm")
register_norm = NORMS.register
_loaded = False


def _load_all() -> None:
    global _loaded
    if _loaded:
        return
    for info in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{info.name}")
    _loaded = True


def create_norm_layer(name: str, num_features: int, dims: int, **kwargs: Any) -> nn.Module:
    """Build the normalization layer ``name`` for ``num_features`` channels."""
    _load_all()
    return NORMS.create(name, num_features, dims, **kwargs)


def norm_names() -> list[str]:
    _load_all()
    return NORMS.names()


class NormFactory:
    """Callable handed to models: ``factory(num_features, dims) -> nn.Module``.

    Hydra instantiates it from ``configs/norm/<name>.yaml``; every key besides ``name`` is
    forwarded to the variant's constructor.
    """

    def __init__(self, name: str, **kwargs: Any) -> None:
        _load_all()
        NORMS.get(name)  # fail early, listing the known names
        self.name = name
        self.kwargs = kwargs

    def __call__(self, num_features: int, dims: int) -> nn.Module:
        return create_norm_layer(self.name, num_features, dims, **self.kwargs)

    def prepare_model(self, model: nn.Module) -> nn.Module:
        """Let a variant rewrite the built model (e.g. weight standardization wraps the convs):
        it does so by defining ``prepare_model(model)`` in its own module."""
        module = sys.modules[NORMS.get(self.name).__module__]
        hook = getattr(module, "prepare_model", None)
        return hook(model) if callable(hook) else model

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.kwargs.items())
        return f"NormFactory({self.name!r}{', ' + args if args else ''})"

