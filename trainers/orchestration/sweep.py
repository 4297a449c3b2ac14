"""``shiftlab-sweep``: hyper-parameter sweeps that drive Optuna directly.

Why not hydra-optuna-sweeper: its last release (1.3.0) pins ``optuna<3`` and its SQLite storage
breaks under SQLAlchemy 2, so it cannot give a maintained Optuna, a resumable study, or a pruner
wired into training. This package is the glue instead: it composes the *same* Hydra config as
``shiftlab-train`` for every trial (Hydra's compose API, overrides = the command line + the
trial's parameters), calls :func:`shiftlab.trainers.train.train`, and lets the
:class:`shiftlab.callbacks.optuna_pruning.OptunaPruning` callback report the monitored metric each epoch.

Backends (:mod:`.optuna_backend`, :mod:`.ray_tune`):

* ``backend=local`` -- ``optuna.Study.optimize`` in this process; the study's pruner stops bad
  trials (the callback stops Lightning cleanly, the objective raises ``optuna.TrialPruned``).
* ``backend=ray`` -- Ray Tune runs the trials on a Ray cluster (``ray.address=auto|host:port``),
  with Tune's ``OptunaSearch`` (same sampler, same storage) suggesting parameters and a Tune
  scheduler matching the configured pruner stopping bad trials.

Layout of ``sweep.dir``: ``study.db`` (SQLite storage), ``sweep.json`` (settings, counts, best
trial), ``trials/<id>/`` (one run directory each: ``.hydra/``, ``metrics.csv``, ``summary.json``,
``trial.json``), ``report/`` (``shiftlab-report``).

Exit codes: 0 a best trial exists, 1 no trial finished, 2 bad input (one line), 130 / 143 a trial
was stopped by SIGINT / SIGTERM (its parameters run first when the same command runs again).
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Sequence

from shiftlab.trainers.orchestration.settings import (SweepError, SweepSettings, available_searches, describe_search,
                                                      missing_search)
from shiftlab.trainers.orchestration.space import parse_search_space
from shiftlab.trainers.orchestration.trial import SweepInterrupted, compose_config, format_override, route_overrides

USAGE = """usage: shiftlab-sweep hparams_search=<name> [overrides...] [sweep settings...]

Runs an Optuna study over the train config; every trial is `shiftlab-train <overrides> <params>`.
Sweep settings (also as sweep.<key>=...): n_trials, backend=local|ray, ray.address=auto|host:port,
sampler, pruner, storage=sqlite:///path|null, timeout_s, dir, study_name, direction.

Searches (hparams_search=<name>, configs/hparams_search/<name>.yaml):
{searches}"""


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry ``shiftlab-sweep``; returns the exit status (0 ok, 2 bad input, 1 no trial finished)."""
    args = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in args):
        print(USAGE.format(searches="\n".join(f"  {describe_search(n)}" for n in available_searches()) or "  none"))
        return 0
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s] %(message)s")
    overrides = route_overrides(args)
    try:
        if not any(a.lstrip("+").startswith("hparams_search=") for a in overrides):
            raise missing_search()
        cfg = compose_config(overrides)
        settings = SweepSettings.from_cfg(cfg)
        parse_search_space(settings.params)
        from shiftlab.trainers.config_checks import ConfigError, check_config

        try:
            check_config(cfg)
        except ConfigError as e:
            raise SweepError(str(e)) from None
        if settings.backend == "ray":
            from shiftlab.trainers.orchestration.ray_tune import run_ray

            root = Path(str(cfg.paths.root_dir))
            if not root.is_absolute():  # Ray workers do not share this working directory
                overrides = overrides + [format_override("paths.root_dir", str(root.resolve()))]
            result = run_ray(settings, overrides, int(cfg.trainer.get("max_epochs") or 1))
        else:
            from shiftlab.trainers.orchestration.optuna_backend import run_local

            result = run_local(settings, overrides)
    except SweepError as e:
        print(f"shiftlab-sweep: error: {e}", file=sys.stderr)
        return 2
    except SweepInterrupted as e:
        from shiftlab.callbacks.run_contract import EXIT_CODES

        print(f"shiftlab-sweep: {e} -> {settings.dir}", file=sys.stderr)
        return EXIT_CODES[e.status]
    except Exception as e:  # hydra composition errors: one line, not a traceback
        from hydra.errors import HydraException

        if isinstance(e, HydraException):
            print(f"shiftlab-sweep: error: {str(e).splitlines()[0]}", file=sys.stderr)
            return 2
        raise
    best = result["best"]
    print(f"sweep {settings.study_name}: {result['counts']} in {result['wall_time_s']:.1f} s -> {settings.dir}")
    if best:
        print(f"best: {best.get('run_dir')} {settings.metric}={best['value']:.4g} params={best['params']}")
    if settings.report:
        from shiftlab.trainers.orchestration.report import make_report

        out = make_report(settings.dir)
        print(f"report: {out['markdown']}")
    return 0 if best else 1


if __name__ == "__main__":
    raise SystemExit(main())
