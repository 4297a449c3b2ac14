"""A stacked member's run directory, with what a plain run writes: metrics.csv, checkpoints/last.ckpt and
best.ckpt (plain state_dict keys, optimizer and scheduler state, Lightning's loop counters, so a plain
run loads and resumes them), summary.json and plots."""
from __future__ import annotations

import csv
import io
import logging
import multiprocessing as mp
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, Callable

import lightning as L
import torch

from shiftlab.callbacks import reporting
from shiftlab.callbacks.run_contract import EXIT_CODES
from shiftlab.trainers.build import build_callbacks
from shiftlab.trainers.checkpoint_io import RunWriteError, atomic_save, atomic_write_text, load_weights_only
from shiftlab.trainers.stacked.engine import Member, StackedGroup
from shiftlab.trainers.summary import _finite, write_outputs, write_summary

log = logging.getLogger("shiftlab")


def _progress(total: dict, current: dict) -> dict:
    return {"total": dict(total), "current": dict(current)}


def fit_loop_state(epochs: int, batches: int, val_batches: int, manual: bool = False) -> dict[str, Any]:
    """Lightning's ``loops`` entry as a plain fit of ``epochs`` epochs of ``batches`` steps leaves it at
    the end of its last epoch (the layout of Lightning 2.x; tests compare it with a real checkpoint)."""
    steps = epochs * batches
    # manual optimization (the full-batch loop): Lightning counts its steps in the manual loop instead
    auto_steps, auto_batches, sched = (0, 0, 0) if manual else (steps, batches, 1)
    four = lambda n: {"ready": n, "started": n, "processed": n, "completed": n}  # noqa: E731
    two = lambda n: {"ready": n, "completed": n}  # noqa: E731
    zero4 = four(0)
    fit = {
        "state_dict": {},
        "epoch_loop.state_dict": {"_batches_that_stepped": steps},
        "epoch_loop.batch_progress": {**_progress(four(steps), four(batches)), "is_last_batch": True},
        "epoch_loop.scheduler_progress": _progress(two(epochs * sched), two(sched)),
        "epoch_loop.automatic_optimization.state_dict": {},
        "epoch_loop.automatic_optimization.optim_progress": {"optimizer": {
            "step": _progress(two(auto_steps), two(auto_batches)),
            "zero_grad": _progress({"ready": auto_steps, "started": auto_steps, "completed": auto_steps},
                                   {"ready": auto_batches, "started": auto_batches, "completed": auto_batches})}},
        "epoch_loop.manual_optimization.state_dict": {},
        "epoch_loop.manual_optimization.optim_step_progress": _progress(two(steps - auto_steps),
                                                                         two(steps - auto_steps)),
        "epoch_loop.val_loop.state_dict": {},
        "epoch_loop.val_loop.batch_progress": {**_progress(four(val_batches), four(val_batches)),
                                               "is_last_batch": True},
        "epoch_progress": _progress({**four(epochs), "completed": epochs - 1},
                                    {**four(epochs), "completed": epochs - 1}),
    }
    idle = {"state_dict": {}, "batch_progress": {**_progress(zero4, zero4), "is_last_batch": False}}
    return {"fit_loop": fit, "validate_loop": copy_of(idle), "test_loop": copy_of(idle),
            "predict_loop": {"state_dict": {}, "batch_progress": _progress(zero4, zero4)}}


def copy_of(d: dict) -> dict:
    import copy

    return copy.deepcopy(d)


def _checkpoint(member: Member, group: StackedGroup, epochs: int, state_dict: dict, optimizer: dict,
                scheduler: dict | None, callbacks: dict) -> dict[str, Any]:
    val_batches = -(-len(member.dm.val_set) // group.eval_batch_size)
    return {"epoch": epochs - 1, "global_step": epochs * group.batches, "pytorch-lightning_version": L.__version__,
            "state_dict": state_dict, "loops": fit_loop_state(epochs, group.batches, val_batches,
                                                               manual=group.full_batch is not None),
            "callbacks": callbacks, "optimizer_states": [optimizer],
            "lr_schedulers": [scheduler] if scheduler is not None else []}


def _checkpoint_callbacks(member: Member) -> list:
    from lightning.pytorch.callbacks import ModelCheckpoint

    return [cb for cb in build_callbacks(member.cfg) if isinstance(cb, ModelCheckpoint)]


def _callback_states(member: Member, out: Path, epochs: int, guard_state: dict, checkpoint_cbs: list,
                     extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The states a plain run's checkpoint callbacks and history hold after ``epochs`` epochs (keyed by
    ``state_key``, as Lightning restores them)."""
    rows = [dict(r) for r in member.history[:epochs]]
    # ProbeBudget: a stacked member has no run-wide probe budget (grouping.py), so its clock starts with the
    # plain run's (0 s before); the member's epoch probes add their own states (``extra``)
    states: dict[str, Any] = {"EpochHistory": {"history": rows}, "DivergenceGuard": guard_state,
                              "ProbeBudget": {"elapsed": 0.0}, **(extra or {})}
    if (member.cfg.get("callbacks") or {}).get("diagnosis") is not None:
        states["LearningCurveDiagnosis"] = {"history": {
            "epoch": [r["epoch"] for r in rows], "train_loss": [r["train/loss"] for r in rows],
            "val_loss": [r["val/loss"] for r in rows], "train_acc": [r["train/acc"] for r in rows]}}
    best = out / "checkpoints" / "best.ckpt"
    for cb in checkpoint_cbs:
        cb.dirpath = str(out / "checkpoints")
        if cb.monitor:
            cb.best_model_score = cb.kth_value = member.best_score
            cb.best_model_path = cb.kth_best_model_path = str(best)
            cb.current_score = torch.tensor(member.history[epochs - 1].get(cb.monitor, float("nan")))
            cb.best_k_models = {str(best): member.best_score}
        else:
            cb.best_model_path = str(out / "checkpoints" / "last.ckpt")
        states[cb.state_key] = cb.state_dict()
    return states


def epoch_writer(members: list[Member], group: StackedGroup, out_dirs: list[Path],
                 extra_states: Callable[[int], dict[str, Any]] | None = None):
    """``on_epoch_end(i, epoch, improved)`` for :meth:`StackedGroup.fit`: member ``i``'s last.ckpt every
    epoch and best.ckpt when val/acc improved, as its plain run's two ModelCheckpoint callbacks write them.
    ``extra_states(i)``: further callback states of member ``i`` (its probes), keyed by ``state_key``."""
    prefixed = lambda sd: {f"model.{k}": v for k, v in sd.items()}  # noqa: E731 - the module's keys
    checkpoint_cbs = [_checkpoint_callbacks(m) for m in members]  # built once, not every epoch

    def write(i: int, epoch: int, improved: bool) -> None:
        member, out = members[i], out_dirs[i]
        nodes = (member.cfg.get("callbacks") or {})
        ckdir = out / "checkpoints"
        ckdir.mkdir(parents=True, exist_ok=True)
        states = _callback_states(member, out, epoch + 1, group.guard.state_dict(i), checkpoint_cbs[i])
        states.update(group.callbacks[i].states())  # early stopping, memorization probe
        states.update(group.dropout.states(i))  # with dropout: RunContract's RNG state (stacked/dropout.py)
        states.update(extra_states(i) if extra_states is not None else {})  # the member's epoch probes
        ckpt = _checkpoint(member, group, epoch + 1, prefixed(group.member_weights(i)),
                           group.member_optimizer_state(i), group.member_scheduler_state(i), states)
        if nodes.get("last_checkpoint") is not None:
            atomic_save(ckpt, ckdir / "last.ckpt")
        if improved and nodes.get("model_checkpoint") is not None:
            atomic_save(ckpt, ckdir / "best.ckpt")

    return write


def finish_member(member: Member, group: StackedGroup, i: int, out: Path) -> None:
    """Final train metrics (last weights) and the test report (``test_ckpt`` weights), on the plain module."""
    if member.status != "completed":
        return
    module, device = member.module, group.device
    module.model.load_state_dict(group.member_weights(i))
    module.to(device)
    member.train_metrics = module.final_train_metrics(member.dm.train_set)
    if not member.cfg.get("test", True):
        return
    which = member.cfg.get("test_ckpt") or "best"
    best, last = out / "checkpoints" / "best.ckpt", out / "checkpoints" / "last.ckpt"
    restored = group.callbacks[i].restored_note() if which == "best" else None
    if restored:
        member.test_weights = restored
    elif which == "best" and best.is_file():
        module.load_state_dict(load_weights_only(best)["state_dict"])
        member.test_weights = f"best: best.ckpt, val/acc={float(member.best_score):.4f}"
    elif which == "last" and last.is_file():
        member.test_weights = "last: last.ckpt (end of the last finished epoch)"
    else:
        member.test_weights = f"final: the weights in memory when training ended (no {which} checkpoint was written)"
    module.model.to(device)
    test = member.dm.test_set
    metrics = module.test_metrics.to(device)
    metrics.reset()
    loss_sum, n = 0.0, 0
    module.model.eval()
    with torch.no_grad():
        for s in range(0, len(test), group.eval_batch_size):
            x, y = test.x[s:s + group.eval_batch_size].to(device), test.y[s:s + group.eval_batch_size].to(device)
            logits = module.model(x)
            loss_sum += float(torch.nn.functional.cross_entropy(logits, y, reduction="sum"))
            n += y.shape[0]
            metrics.update(logits, y)
    values = {k: v.detach().cpu().tolist() for k, v in metrics.compute().items()}
    member.test_metrics = {"loss": loss_sum / max(n, 1), **values}


def _metrics_csv(member: Member, batches: int) -> str:
    """metrics.csv as the plain run's CSV logger writes it: a val row and a train row per epoch, a test row."""
    cols = ["epoch", "step", "test/acc", "test/f1_macro", "test/loss", "test/precision_macro",
            "test/recall_macro", "train/acc", "train/loss", "val/acc", "val/loss", "val/loss_se"]
    # epoch-end values of the member's callbacks (early_stop/*, mem/*, probe_cost/*) go in the train row
    extra = sorted({k for r in member.history for k in r} - set(cols))
    cols = sorted(cols + extra)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, lineterminator="\n")
    w.writeheader()
    for r in member.history:
        step = (r["epoch"] + 1) * batches - 1
        w.writerow({"epoch": r["epoch"], "step": step, **{k: r[k] for k in ("val/acc", "val/loss", "val/loss_se")}})
        w.writerow({"epoch": r["epoch"], "step": step, **{k: r[k] for k in ("train/acc", "train/loss", *extra) if k in r}})
    if member.test_metrics:
        t = member.test_metrics
        w.writerow({"epoch": len(member.history), "step": len(member.history) * batches,
                    **{f"test/{k}": t[k] for k in ("acc", "f1_macro", "loss", "precision_macro", "recall_macro")}})
    return buf.getvalue()


def member_summary(member: Member, group: StackedGroup, i: int, out: Path, wall: float,
                   probes: list | None = None) -> tuple[dict[str, Any], list[tuple[Callable, tuple]]]:
    """Write member ``i``'s metrics.csv (checkpoints are written every epoch by :func:`epoch_writer`);
    return its summary and the drawing it still needs: ``(function, args)`` pairs that write summary.json
    and the plots, as :func:`~shiftlab.trainers.summary.write_outputs` writes them for a plain run.
    ``probes``: the member's epoch probes (reporters)."""
    epochs = len(member.history)
    atomic_write_text(out / "metrics.csv", _metrics_csv(member, group.batches))
    h = member.history[-1] if member.history else {}
    done = member.status == "completed"
    diagnosed, drawings = diagnose_member(member, out)
    reporters = [*(probes or []), *diagnosed, *group.callbacks[i].reporters()]
    reason = (reporting.stop_reason(reporters) or f"max_epochs={group.max_epochs} reached") if done else member.stop_reason
    last = out / "checkpoints" / "last.ckpt"
    if not done:
        reason += f"; {last} kept (end of the last finished epoch)" if last.is_file() else \
            f"; no checkpoint was written ({member.status} before the first epoch ended)"
    summary: dict[str, Any] = {
        "status": member.status, "stop_reason": reason,
        "epochs_run": epochs, "global_step": epochs * group.batches if done else member.stopped_step,
        "wall_time_s": round(wall, 3),
        "train/loss_epoch_mean": h.get("train/loss"), "train/acc_epoch_mean": h.get("train/acc"),
        "val/loss": h.get("val/loss"), "val/acc": h.get("val/acc"), **member.train_metrics,
    }
    if member.test_metrics:
        t = member.test_metrics
        summary.update({f"test/{k}": v for k, v in t.items() if k != "confusion_matrix"})
        summary["test/confusion_matrix"] = t.get("confusion_matrix")
        summary["test/weights"] = member.test_weights
    if member.train_metrics:
        summary["train/weights"] = "final: the weights in memory when training ended"
    summary["data"] = member.dm.describe()
    summary["resumed_from"] = None
    if member.status in EXIT_CODES:  # a signal: where to resume, as a plain run's summary says
        summary.update({"epoch": epochs, "step": member.stopped_step,
                        "resume_from": str(last) if last.is_file() else None})
    summary["run_dir"] = str(out)
    summary["stacked"] = {"group_size": group.k, "member": i, "device": str(group.device),
                          "wall_time_note": "wall_time_s is the whole group's time"}
    summary.update(reporting.summary_items(reporters))
    group.callbacks[i].write_files(out)
    summary = {k: _finite(v) for k, v in summary.items()}
    title = f"{member.cfg.get('task_name', 'train')}: {out.name}"
    note = "; ".join(reporting.plot_notes(reporters)) or None
    return summary, [(write_outputs, (out, summary, member.history, title, note)), *drawings]


def write_members(members: list[Member], group: StackedGroup, out_dirs: list[Path], wall: float,
                  workers: int | None = None, probes: list[list] | None = None) -> list[dict[str, Any]]:
    """Every member's metrics.csv, summary.json and plots; return the summaries.

    The figures (~1 s of matplotlib per member, most of a small group's output time) are drawn by
    ``workers`` forked processes (default: one per available CPU, at most one per member), and this waits
    for all of them. A member whose output could not be written ends ``failed`` with the reason, as a
    plain run's summary says when its plots fail; the other members keep theirs."""
    done = [member_summary(m, group, i, Path(out), wall, probes[i] if probes else None)
            for i, (m, out) in enumerate(zip(members, out_dirs))]
    errors = draw_all([d for _, d in done], plot_workers(len(done)) if workers is None else workers)
    summaries = []
    for i, (summary, _) in enumerate(done):
        if errors[i] is not None:
            log.error("%s", errors[i])
            summary = {**summary, "status": "failed", "stop_reason": errors[i]}
            try:  # the summary is small: it may still fit where a plot did not
                write_summary(Path(out_dirs[i]), summary)
            except RunWriteError:
                pass
        summaries.append(summary)
    return summaries


def plot_workers(members: int) -> int:
    """One drawing process per CPU this process may run on, at most one per member; 1 (draw here) where
    processes cannot be forked."""
    if "fork" not in mp.get_all_start_methods():
        return 1
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(members, cpus))


def draw(drawings: list[tuple[Callable, tuple]]) -> str | None:
    """Run one member's drawings; the first error as the one line its summary gives (None: all written)."""
    try:
        for fn, args in drawings:
            fn(*args)
    except RunWriteError as e:
        return str(e)
    except Exception as e:  # noqa: BLE001 - a plot that fails fails its member, as a plain run's job
        return f"{type(e).__name__}: {e}"
    return None


def draw_all(per_member: list[list[tuple[Callable, tuple]]], workers: int) -> list[str | None]:
    """Each member's drawings, in ``workers`` forked processes (here when ``workers`` <= 1): forked, not
    spawned, so a worker starts with matplotlib already imported and nothing is re-imported."""
    if workers <= 1 or len(per_member) <= 1:
        return [draw(d) for d in per_member]
    with ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("fork")) as pool:
        futures = [pool.submit(draw, d) for d in per_member]
        errors = []
        for f in futures:
            try:
                errors.append(f.result())
            except Exception as e:  # noqa: BLE001 - a worker that died (killed, out of memory)
                errors.append(f"plot worker failed: {type(e).__name__}: {e}")
        return errors


def diagnose_member(member: Member, out: Path) -> tuple[list, list[tuple[Callable, tuple]]]:
    """The configured LearningCurveDiagnosis, fed the member's history as its callback hooks would feed it:
    ``diagnosis`` in summary.json and its plot note; returns the reporters and the
    plots/learning_curve_diagnosis.png drawings still to make."""
    from shiftlab.callbacks.learning_curve_diagnosis import LearningCurveDiagnosis, diagnose, plot_diagnosis

    found = [cb for cb in build_callbacks(member.cfg) if isinstance(cb, LearningCurveDiagnosis)]
    drawings: list[tuple[Callable, tuple]] = []
    for cb in found:
        rows = [r for r in member.history if cb.train_key in r and cb.val_key in r]
        if not rows:
            continue
        cb.history = {"epoch": [r["epoch"] for r in rows], "train_loss": [r[cb.train_key] for r in rows],
                      "val_loss": [r[cb.val_key] for r in rows],
                      "train_acc": [r.get(cb.train_acc_key, float("nan")) if cb.train_acc_key else float("nan")
                                    for r in rows]}
        acc = cb.history["train_acc"] if all(a == a for a in cb.history["train_acc"]) else None
        cb.diagnosis = diagnose(cb.history["train_loss"], cb.history["val_loss"], acc, **cb.diagnose_kwargs)
        if cb.plot:
            path = Path(cb.output_dir or out) / "plots" / "learning_curve_diagnosis.png"
            drawings.append((plot_diagnosis, (cb.history, cb.diagnosis, path)))
    return found, drawings
