"""Orchestration around ``shiftlab-train``: sweeps, reports, pipeline steps, Ray.

Nothing here changes how one run trains; these modules compose the same config
(:mod:`shiftlab.trainers.compose`) and call the same :func:`shiftlab.trainers.train.train`.

* :mod:`.sweep` -- the ``shiftlab-sweep`` command line; :mod:`.settings` (the ``sweep:`` node
  checked), :mod:`.space` (search space, sampler, pruner), :mod:`.trial` (one trial),
  :mod:`.records` (``trial.json`` / ``sweep.json``), backends :mod:`.optuna_backend` (local) and
  :mod:`.ray_tune` (Ray Tune).
* :mod:`.report` -- ``shiftlab-report``: tables and plots over a sweep or multirun directory
  (:mod:`.runs` collects the run directories into a data frame).
* :mod:`.pipeline` -- prepare-data and evaluate steps for schedulers (the Airflow DAG).
* :mod:`.ray_ddp` -- one run data-parallel over Ray Train workers.
* :mod:`.ray_settings` -- the ``ray.*`` settings both Ray entry points use, parsed once.
"""
