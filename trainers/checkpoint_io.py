"""Atomic writes and weights-only loads for everything a run directory holds.

Why not Lightning's default: it writes the temp file in ``TMPDIR`` and moves it with
``shutil.move``, which degrades to copy + truncate when TMPDIR and the run directory are on
different filesystems (``/tmp`` vs a volume), so a kill or a full disk can leave a 0-byte or
partial ``last.ckpt``. Here every file is written next to its destination, flushed, fsynced and
moved with ``os.replace`` (atomic on POSIX): a failed write leaves the previous good file intact.

Loading is weights-only (no arbitrary pickle): the allow-list below is everything shiftlab's own
checkpoints hold besides tensors and builtins.
"""
from __future__ import annotations

import collections
import contextlib
import errno
import os
import shutil
import re
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO


class RunWriteError(OSError):
    """A run-directory file could not be written; the previous version (if any) is intact."""

    def __str__(self) -> str:  # one line, without OSError's "[Errno n]" prefix
        return str(self.strerror or super().__str__())


class CheckpointLoadError(ValueError):
    """A checkpoint is missing, damaged, or holds objects outside the allow-list."""


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _current_umask()


def _disk_full(directory: Path, margin: int = 1 << 20) -> bool:
    try:
        return shutil.disk_usage(directory).free < margin
    except OSError:
        return False


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):  # some filesystems refuse fsync on directories
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb") -> Iterator[Any]:
    """Open a temp file beside ``path``; on success fsync it and ``os.replace`` it onto ``path``.

    On any error the temp file is removed and :class:`RunWriteError` names the file; ``path`` keeps
    its previous content.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp's 0600 would hide results from other users
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(e, RunWriteError) or not isinstance(e, Exception):
            raise
        # torch reports a full disk as a RuntimeError from its zip writer, not as ENOSPC.
        why = e.strerror if isinstance(e, OSError) and e.strerror else (str(e).strip().splitlines() or [""])[0]
        if _disk_full(path.parent) and "space" not in why:
            why = f"no space left on device ({why})" if why else "no space left on device"
        raise RunWriteError(getattr(e, "errno", None) or errno.EIO, f"could not write {path}: {why}") from e
    _fsync_dir(path.parent)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_open(path, "w") as f:
        f.write(text)


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` with the atomic-write guarantee."""
    with atomic_open(path, "wb") as f:
        torch.save(obj, f)


def _allowed_globals() -> list:
    """Non-tensor objects shiftlab checkpoints may hold (callback states, scheduler states)."""
    import numpy as np

    allowed: list = [collections.OrderedDict, collections.deque, collections.defaultdict, Path,
                     type(Path()), np.dtype, np.ndarray, np.float64, np.float32, np.int64, np.int32, np.bool_]
    with contextlib.suppress(Exception):  # numpy >= 1.25 / 2.x spell these differently
        from numpy.core.multiarray import _reconstruct, scalar  # type: ignore[attr-defined]

        allowed += [_reconstruct, scalar]
    with contextlib.suppress(Exception):
        from numpy._core.multiarray import _reconstruct as r2, scalar as s2  # type: ignore[attr-defined]

        allowed += [r2, s2]
    allowed += [type(np.dtype(t)) for t in ("float64", "float32", "int64", "int32", "bool")]
    return allowed


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> dict[str, Any]:
    """Load a Lightning checkpoint weights-only; :class:`CheckpointLoadError` with a one-line
    reason if it is missing, truncated, not a checkpoint, or holds objects outside the allow-list."""
    ckpt = load_weights_only(path, map_location)
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise CheckpointLoadError(f"{Path(path).name} is not a Lightning checkpoint (no state_dict)")
    return ckpt


def load_weights_only(path: str | os.PathLike, map_location: Any = "cpu") -> Any:
    """``torch.load(weights_only=True)`` with shiftlab's allow-list and one-line errors."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointLoadError(f"{path} does not exist")
    try:
        with torch.serialization.safe_globals(_allowed_globals()):
            ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many types for damaged files
        raise CheckpointLoadError(f"{path.name} cannot be read: {_load_failure(e)}") from None
    return ckpt


def _load_failure(e: Exception) -> str:
    """One line saying why torch.load refused a file (torch's own message is a paragraph)."""
    text = str(e)
    m = re.search(r"(?:unsupported GLOBAL|Unsupported global:?) ?([\w.]+)", text)
    if m:
        return f"it holds {m.group(1)}, outside shiftlab's allow-list (loading it could run arbitrary code)"
    if "central directory" in text or "zip archive" in text or isinstance(e, EOFError):
        return "the file is truncated or not a torch archive"
    if "Unsupported operand" in text or "invalid load key" in text:
        return "the file is not a torch checkpoint"
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return lines[0] if lines else type(e).__name__


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning ``CheckpointIO`` plugin: atomic saves, weights-only allow-listed loads."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any = None) -> None:
        if storage_options is not None:
            raise TypeError("storage_options are not supported")
        atomic_save(checkpoint, path)

    def load_checkpoint(self, path, map_location: Callable | Any = None, weights_only: bool | None = None
                        ) -> dict[str, Any]:
        # Lightning also loads its own temp files (ddp_spawn hands weights back through one).
        return load_weights_only(path, map_location=map_location if map_location is not None else "cpu")

    def remove_checkpoint(self, path) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def epoch_checkpoint(trainer, names: tuple[str, ...] = ("last.ckpt",)) -> Path | None:
    """The first of ``names`` that really exists in the trainer's checkpoint directories (default:
    ``last.ckpt``, the end of the last finished epoch), else None."""
    dirs = [Path(d) for d in (getattr(cb, "dirpath", None) for cb in trainer.checkpoint_callbacks) if d]
    for name in names:
        for d in dirs:
            if (d / name).is_file():
                return d / name
    return None


def test_weights(trainer, which: str) -> tuple[Path | None, str]:
    """The checkpoint the test split is evaluated on, and a description of it for ``summary.json``.

    ``which`` is ``best`` (the monitored ModelCheckpoint's best file, as Lightning's ``ckpt_path="best"``) or
    ``last`` (``last.ckpt``). With ``best``, weights a stopping callback restored (``restored_epoch`` set) are
    the best the run knows and stay in memory. Without a checkpoint file (no checkpoint callbacks) the final
    weights in memory are used, and the description says so. The weights are loaded into the module, not
    through ``trainer.test(ckpt_path=...)``, which would also restore the callbacks' states of that epoch.
    """
    if which == "best":
        for cb in trainer.callbacks:  # a stopping callback that restored its best epoch: those weights
            epoch = getattr(cb, "restored_epoch", None)
            if epoch is not None:
                return None, (f"best: weights restored by {type(cb).__name__} (epoch {epoch}, "
                              f"{getattr(cb, 'monitor', '?')})")
        best = [cb for cb in trainer.checkpoint_callbacks if getattr(cb, "monitor", None)
                and getattr(cb, "best_model_path", "") and Path(cb.best_model_path).is_file()]
        if best:
            cb = best[0]
            score = cb.best_model_score
            shown = f", {cb.monitor}={float(score):.4f}" if score is not None else ""
            return Path(cb.best_model_path), f"best: {Path(cb.best_model_path).name}{shown}"
    elif which == "last":
        last = epoch_checkpoint(trainer)
        if last is not None:
            return last, f"last: {last.name} (end of the last finished epoch)"
    return None, f"final: the weights in memory when training ended (no {which} checkpoint was written)"
