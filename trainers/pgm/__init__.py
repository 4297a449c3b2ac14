"""Chain-structured probabilistic models with exact inference (``model=hmm|crf|position_softmax``).

- :mod:`chain`: forward / backward / posterior marginals / expected transitions / Viterbi in log
  space, batched over sequences and states, variable lengths by masks.
- :mod:`hmm`: true HMM parameters (sampling, ceilings) and the trainable logit HMM.
- :mod:`crf`: linear-chain CRF over a 1-D conv encoder, and the per-position softmax baseline.
- :mod:`em`: Baum-Welch EM, the full-batch reference trainer.
- :mod:`matching`: Hungarian matching of learned to true states.
- :mod:`calibration`: ECE and reliability diagrams of the posterior marginals.
- :mod:`metrics`: one scoring function for runs, experiments and tests.
"""
