"""BatchNorm on the Triton kernels in ``kernels/`` (same maths and state_dict as ``batchnorm``).

Why: identical results to torch's BatchNorm, faster on the GPU; the covariate-shift probes can
read the batch statistics through ``module.stats_observer`` without another pass. ``kernels`` is
imported lazily (inside ``build``) so importing the norm registry never fixes Triton's
interpreter/compile mode before a test has set ``TRITON_INTERPRET``.
"""
from __future__ import annotations

from torch import nn

from shiftlab.trainers.norms import register_norm


@register_norm("triton_bn")
def build(num_features: int, dims: int, eps: float = 1e-5, momentum: float | None = 0.1,
          affine: bool = True, track_running_stats: bool = True, sync: bool = False) -> nn.Module:
    from shiftlab.kernels import TritonBatchNorm1d, TritonBatchNorm2d, TritonBatchNorm3d

    classes = {0: TritonBatchNorm1d, 1: TritonBatchNorm1d, 2: TritonBatchNorm2d, 3: TritonBatchNorm3d}
    if dims not in classes:
        raise ValueError(f"norm=triton_bn: dims={dims!r} is invalid; allowed: 0, 1, 2, 3")
    return classes[dims](num_features, eps=eps, momentum=momentum, affine=affine,
                         track_running_stats=track_running_stats, sync=bool(sync))
