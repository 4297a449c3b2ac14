"""Task modules (the ``module`` config group): one LightningModule base and the tasks.

- :mod:`base`: :class:`~shiftlab.trainers.modules.base.TaskModule`, the shared machinery
  (mini-batch step, full-batch step through :mod:`shiftlab.trainers.full_batch`, logging policy,
  optimizers, evaluation and test-report skeleton) and the contract a task fills in.
- :mod:`classification`: ``module=classification``, cross-entropy on class logits.
- :mod:`sequence`: ``module=sequence``, per-token NLL of chain models (``model=hmm|crf|position_softmax``).
"""
