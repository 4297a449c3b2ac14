"""Early-stopping rules as plain Python objects, a registry, and a replay over recorded curves.

One module per family: :mod:`.base` (the base class), :mod:`.patience`, :mod:`.prechelt`
(gl / pq / up), :mod:`.quadratic` (quadratic / se_slope), :mod:`.forecast`, :mod:`.learned`
(learned / curvature) and :mod:`.registry` (``make_rule``, ``register_rule``, ``replay``). The
Lightning callback that runs any of them is
:class:`shiftlab.callbacks.early_stopping.RuleEarlyStopping`.

Why plain objects: the same rule must decide identically inside the callback, in a unit test on
a hand-made curve, and in the benchmark that replays thousands of recorded curves. A rule consumes
one epoch at a time (``update(value, train_value, se)``), answers stop / go, and remembers the best
epoch (whose weights the callback restores). No torch, no Trainer. A rule of your own: subclass
:class:`StoppingRule`, decorate it with ``@register_rule("name")`` in a module the run imports
(``imports: [my_rules]``), then ``callbacks.curvature_stop.rule=name``.

Rules (``make_rule(name, **kwargs)``; ``mode="min"`` unless told):

``curvature``  shiftlab's default (:class:`CurvatureRule`): the ``learned`` rule with the setting
    chosen on the benchmark's tuning split. It reads the curve's recent gains and slope in units
    of the measured noise, the time since the best, the train curve and the generalization gap,
    and logs a parametric forecast (predicted minimum with an interval, epochs left).
``learned``    :class:`LearnedRule`: logistic regression on :func:`curve_features`, shipped as
    plain coefficients.
``forecast``   :class:`ForecastRule`: fits ``a + b exp(-s/k) + c s`` to the curve so far and stops
    when the chance of improving by more than ``min_delta`` within the look-ahead is small.
``se_slope``   :class:`SESlopeRule`: the local quadratic test with the noise taken from the
    measured standard errors of the validation loss.
``quadratic``  :class:`QuadraticRule` (shiftlab's v1 ``curvature``): a weighted local quadratic
    fit over a trailing window gives the smoothed value, slope and curvature at the newest epoch
    with standard errors; it stops when the minimum has been passed with confidence, or when the
    improvement still to come is below ``min_delta``.
``patience``   Lightning/Keras style: stop after ``patience`` epochs without an improvement of
    more than ``min_delta``.
``gl``         Prechelt (1998) GL_alpha: stop when the generalization loss
    ``GL = 100 * (E_va / E_opt - 1)`` exceeds ``alpha``.
``pq``         Prechelt's PQ_alpha: at the end of each strip of ``k`` epochs, stop when
    ``GL / P_k > alpha`` with training progress ``P_k = 1000 * (mean of the strip's train errors /
    their min - 1)``. Needs the training curve.
``up``         Prechelt's UP_s: stop when the validation error rose at the end of ``s``
    successive strips of ``k`` epochs.

Every rule takes ``mode`` (``min`` | ``max``; ``learned`` / ``curvature``: ``min`` only) and
``warmup`` (epochs before any decision; the best epoch is still tracked during warm-up). A
non-finite monitored value stops at once. ``update(value, train_value, se)`` takes the epoch's
training value and the standard error of the monitored value when they are known; rules that
use them fall back on the curve itself without them.
"""

from __future__ import annotations

from shiftlab.callbacks.stopping_rules.base import MODES, StoppingRule
from shiftlab.callbacks.stopping_rules.registry import RULES, Decision, make_rule, register_rule, replay
from shiftlab.callbacks.stopping_rules.patience import PatienceRule
from shiftlab.callbacks.stopping_rules.evidence import EvidenceRule
from shiftlab.callbacks.stopping_rules.prechelt import GLRule, PQRule, UPRule, training_progress
from shiftlab.callbacks.stopping_rules.quadratic import LocalFit, QuadraticRule, SESlopeRule, local_quadratic_fit
from shiftlab.callbacks.stopping_rules.forecast import Forecast, ForecastRule, forecast_curve
from shiftlab.callbacks.stopping_rules.learned import (FEATURES, LEARNED_COEF, LEARNED_DELTA, CurvatureRule,
                                                       LearnedRule, curve_features)

__all__ = [
    "StoppingRule", "MODES", "PatienceRule", "EvidenceRule", "GLRule", "PQRule", "UPRule", "training_progress",
    "CurvatureRule", "QuadraticRule", "SESlopeRule", "ForecastRule", "Forecast", "forecast_curve",
    "LearnedRule", "curve_features", "FEATURES", "LEARNED_COEF", "LEARNED_DELTA", "LocalFit",
    "local_quadratic_fit", "Decision", "make_rule", "register_rule", "replay", "RULES",
]
