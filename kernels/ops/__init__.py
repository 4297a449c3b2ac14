"""The ops layer of ``shiftlab.kernels``: Triton kernels, their launchers and torch fallbacks,
``torch.library`` op registration and the autograd Functions (the modules live one level up).

- ``bn_kernels``: the BatchNorm ``@triton.jit`` kernels;
- ``batchnorm``: their launchers, torch fallbacks and the ``shiftlab::bn_*`` ops;
- ``sync_batchnorm``: the SyncBatchNorm autograd Function;
- ``stats_merge``: the one cross-rank statistics merge, shared with ``trainers/norms`` (torch only);
- ``layernorm``: LayerNorm / RMSNorm kernels, launchers, the ``shiftlab::ln_*`` ops, ``layer_norm``.

Nothing is imported here, so ``stats_merge`` can be imported without Triton.
"""
