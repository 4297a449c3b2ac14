"""The early-stopping benchmark's measuring stick: corpus loading and splits, replay, the two
frontiers, the gap-closed score with its bootstrap interval and the per-subgroup table.

Why its own module: the numbers must be computed one way whether the benchmark reports on the
held-out split, on the fresh set, or tunes a rule (:mod:`shiftlab.experiments.early_stopping_tuning`);
see :mod:`shiftlab.experiments.early_stopping_benchmark` for the definitions.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from shiftlab.experiments.early_stopping_corpus import CORPUS_V1, CORPUS_V2, load_corpus

FAMILY = {"mlp": "mlp", "cnn": "cnn", "resnet": "resnet", "vgg": "vgg", "crf": "chain",
          "position_softmax": "chain", "hmm": "chain"}
# Held-out cells: every data set and every model family of the tuning split appears, but never
# the same (data set, model) pair; resnet is seen only here.
HELD_OUT_CELLS = frozenset({("digits", "cnn"), ("digits", "resnet"), ("mnist1d", "mlp"),
                            ("synthetic", "cnn"), ("hmm_sequences", "position_softmax")})
PATIENCES = tuple(range(1, 31))
TAUS = tuple(float(t) for t in np.linspace(0.0, 0.2, 41))
SUBGROUP_KEYS = ("data", "family", "optimizer", "noise", "batch", "schedule")
GOAL_KEYS = ("data", "optimizer", "noise", "batch")  # the subgroups (others: shown only)


# ------------------------------------------------------------------------------------------------
# corpus
# ------------------------------------------------------------------------------------------------
def noise_bucket(rate: float) -> str:
    if rate == 0:
        return "0"
    return "0.1-0.2" if rate <= 0.2 else ("0.3-0.4" if rate <= 0.4 else "0.5-0.6")


def _normalize(run: dict[str, Any], corpus: str) -> dict[str, Any]:
    se = run.get("val_loss_se")
    return {
        "id": run["id"], "corpus": corpus, "data": run["data"], "model": run["model"],
        "family": FAMILY[run["model"]], "optimizer": run["optimizer"],
        "schedule": run.get("schedule", "constant"), "label_noise": float(run["label_noise"]),
        "noise": noise_bucket(float(run["label_noise"])), "batch": run.get("batch", "mini"),
        "val_loss": [float(v) for v in run["val_loss"]],
        "val_loss_se": None if se is None else [float(v) for v in se],
        "train_loss": [float(v) for v in run["train_loss"]],
        "test_loss": [float(v) for v in run["test_loss"]],
    }


def load_runs(v1: Path | None = CORPUS_V1, v2: Path | None = CORPUS_V2) -> list[dict[str, Any]]:
    """Corpus v1 (72 constant-lr mini-batch curves, no standard errors) plus corpus v2; runs with
    a non-finite validation or test loss (diverged) are dropped."""
    runs = []
    if v1 is not None and v1.exists():
        runs += [_normalize(r, "v1") for r in json.loads(v1.read_text())["runs"]]
    if v2 is not None:
        runs += [_normalize(r, "v2") for r in load_corpus(v2)]
    return [r for r in runs if all(math.isfinite(v) for v in r["val_loss"] + r["test_loss"])]


def split_runs(runs: list[dict]) -> tuple[list[dict], list[dict]]:
    """(tuning, held-out) by (data set, model) cell."""
    held = [r for r in runs if (r["data"], r["model"]) in HELD_OUT_CELLS]
    tune = [r for r in runs if (r["data"], r["model"]) not in HELD_OUT_CELLS]
    return tune, held


# ------------------------------------------------------------------------------------------------
# replay and frontiers
# ------------------------------------------------------------------------------------------------
def outcome(run: dict, stop: int, best: int) -> tuple[float, float]:
    """(fraction of the horizon trained, test-loss regret at the restored epoch)."""
    tl = run["test_loss"]
    return (stop + 1) / len(tl), tl[best] - min(tl)


def replay_rule(factory: Callable[[], Any], runs: Sequence[dict], use_se: bool = True
                ) -> np.ndarray:
    """Replay a fresh rule per run; returns (n, 2) of (epochs fraction, regret)."""
    from shiftlab.callbacks.stopping_rules import replay

    out = np.empty((len(runs), 2))
    for i, run in enumerate(runs):
        d = replay(factory(), run["val_loss"], run["train_loss"],
                   val_se=run["val_loss_se"] if use_se else None)
        out[i] = outcome(run, d.stop_epoch, d.best_epoch)
    return out


def patience_frontier(runs: Sequence[dict], patiences: Sequence[int] = PATIENCES) -> np.ndarray:
    """(len(patiences), n, 2): Lightning-style patience (raw arg-min restored) per run."""
    out = np.empty((len(patiences), len(runs), 2))
    for j, run in enumerate(runs):
        v = run["val_loss"]
        for i, p in enumerate(patiences):
            best, wait, stop = 0, 0, len(v) - 1
            for t in range(1, len(v)):
                if v[t] < v[best]:
                    best, wait = t, 0
                else:
                    wait += 1
                    if wait >= p:
                        stop = t
                        break
            out[i, j] = outcome(run, stop, best)
    return out


def oracle_frontier(runs: Sequence[dict], taus: Sequence[float] = TAUS) -> np.ndarray:
    """(len(taus), n, 2): stop at the first epoch within ``tau`` (relative) of the run's future
    validation minimum and restore it."""
    out = np.empty((len(taus), len(runs), 2))
    for j, run in enumerate(runs):
        v = np.asarray(run["val_loss"])
        lo = v.min()
        for i, tau in enumerate(taus):
            t = int(np.argmax(v <= lo + tau * abs(lo)))
            out[i, j] = outcome(run, t, t)
    return out


def frontier_at(front: np.ndarray, idx: np.ndarray, epochs: float) -> float:
    """The frontier's mean regret over runs ``idx``, interpolated at mean epochs ``epochs``."""
    m = front[:, idx].mean(axis=1)
    order = np.argsort(m[:, 0], kind="stable")
    return float(np.interp(epochs, m[order, 0], m[order, 1]))


def gap_closed(rule: np.ndarray, pat: np.ndarray, orc: np.ndarray, idx: np.ndarray
               ) -> dict[str, float]:
    """Gap-closed score of ``rule`` on runs ``idx`` at its own mean epochs."""
    e, rr = rule[idx].mean(axis=0)
    rp, ro = frontier_at(pat, idx, e), frontier_at(orc, idx, e)
    gap = rp - ro
    return {"epochs": float(e), "regret": float(rr), "patience_regret": rp, "oracle_regret": ro,
            "gap_closed": float((rp - rr) / gap) if gap > 0 else math.nan}


def bootstrap(rule: np.ndarray, pat: np.ndarray, orc: np.ndarray, idx: np.ndarray,
              reps: int = 1000, seed: int = 0) -> dict[str, Any]:
    """Point estimates plus percentile 95% intervals (runs resampled with replacement)."""
    rng = np.random.default_rng(seed)
    point = gap_closed(rule, pat, orc, idx)
    draws = {k: [] for k in point}
    for _ in range(reps):
        b = idx[rng.integers(0, len(idx), len(idx))]
        for k, v in gap_closed(rule, pat, orc, b).items():
            draws[k].append(v)
    ci = {f"{k}_ci": [float(np.nanpercentile(v, 2.5)), float(np.nanpercentile(v, 97.5))]
          for k, v in draws.items()}
    se = {f"{k}_se": float(np.nanstd(v)) for k, v in draws.items()}
    return {**point, **ci, **se}


def subgroup_table(rule: np.ndarray, pat: np.ndarray, runs: Sequence[dict], idx: np.ndarray,
                   reps: int = 300, seed: int = 1) -> list[dict[str, Any]]:
    """Per subgroup of ``idx``: the rule's mean regret minus the subgroup's patience frontier at
    the rule's mean epochs there, with a bootstrap SE; ``worse`` when that exceeds one SE."""
    rng = np.random.default_rng(seed)
    rows = []
    for key in SUBGROUP_KEYS:
        for val in sorted({runs[i][key] for i in idx}):
            g = np.array([i for i in idx if runs[i][key] == val])

            def diff(s: np.ndarray) -> tuple[float, float, float]:
                e, rr = rule[s].mean(axis=0)
                rp = frontier_at(pat, s, e)
                return rr - rp, e, rp

            d, e, rp = diff(g)
            boots = [diff(g[rng.integers(0, len(g), len(g))])[0] for _ in range(reps)]
            se = float(np.std(boots)) if len(g) > 1 else math.inf
            p10 = pat[PATIENCES.index(10), g].mean(axis=0)
            rows.append({"key": key, "value": str(val), "n": int(len(g)), "epochs": e,
                         "regret": float(rule[g, 1].mean()), "patience_regret": rp,
                         "diff": d, "se": se, "worse": bool(d > se),
                         "p10_epochs": float(p10[0]), "p10_regret": float(p10[1])})
    return rows
