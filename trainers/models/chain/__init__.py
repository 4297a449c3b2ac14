"""Exact inference and scoring for the chain models (``model=hmm|crf|position_softmax``, in
:mod:`shiftlab.trainers.models.hmm` and :mod:`shiftlab.trainers.models.crf`).

- :mod:`inference`: forward / backward / posterior marginals / expected transitions / Viterbi in
  log space, batched over sequences and states, variable lengths by masks.
- :mod:`em`: Baum-Welch EM, the full-batch reference trainer.
- :mod:`matching`: Hungarian matching of learned to true states.
- :mod:`calibration`: ECE and reliability diagrams of the posterior marginals.
- :mod:`metrics`: one scoring function for runs, experiments and tests.
"""
