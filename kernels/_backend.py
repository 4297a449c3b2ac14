"""Which engine runs the norm kernels: Triton on CUDA, the Triton interpreter, or plain torch.

The choice is read once, at import, because Triton decides at ``@triton.jit`` time whether a
kernel is compiled or interpreted: ``TRITON_INTERPRET=1`` must be in the environment before
``kernels`` is first imported. Without CUDA and outside the interpreter every op falls back to
an equivalent torch implementation and warns once.
"""
from __future__ import annotations

import functools
import os
import warnings

import torch

INTERPRET: bool = os.environ.get("TRITON_INTERPRET", "0") == "1"

try:  # triton is a Linux-only dependency
    import triton  # noqa: F401
    import triton.language as tl  # noqa: F401

    HAS_TRITON = True
except Exception:  # pragma: no cover - exercised only where triton is missing
    HAS_TRITON = False

_warned = False


def backend_name(device: torch.device | str | None = None) -> str:
    """``"triton"``, ``"triton-interpreter"`` or ``"torch"`` for tensors on ``device``."""
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if HAS_TRITON and dev.type == "cuda" and not INTERPRET:
        return "triton"
    if HAS_TRITON and INTERPRET and dev.type == "cpu":
        return "triton-interpreter"
    return "torch"


def use_triton(x: torch.Tensor) -> bool:
    """True when ``x`` can go through the Triton kernels; warns once when it cannot."""
    global _warned
    name = backend_name(x.device)
    if name != "torch":
        return True
    if not _warned:
        _warned = True
        why = ("triton is not installed" if not HAS_TRITON else
               f"tensor on {x.device.type} without CUDA and TRITON_INTERPRET is not 1 "
               "(it must be set before `kernels` is imported)")
        warnings.warn(f"kernels: falling back to torch ops ({why}).", RuntimeWarning, stacklevel=3)
    return False


def num_programs_target(x: torch.Tensor) -> int:
    """How many programs a reduction should spread over: enough to fill every SM a few times.

    In the interpreter programs run one after another in Python, so a handful is enough to
    exercise the multi-chunk combine while keeping tests fast.
    """
    if x.is_cuda and not INTERPRET:
        return 4 * _sm_count(x.device.index if x.device.index is not None else torch.cuda.current_device())
    return 4


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count
