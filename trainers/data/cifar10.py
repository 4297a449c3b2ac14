"""CIFAR-10 from the official python-pickle archive (the format torchvision reads).

Why our own loader: there is no CPU build of torchvision here, and the format is simple. The
archive is downloaded once into ``root`` (md5-checked) and read into memory as float tensors.
Offline, point ``data.url`` at a local ``file://`` archive or pre-place it in ``root``.

Why the batches are safe to read: every load checks each batch file's md5 (not only right after
the download), so a damaged or tampered file in an existing folder is refused, and the files go
through :class:`BatchUnpickler`, which resolves only the three numpy globals the official batches
reference -- a pickle that names anything else (``os.system``, ...) fails before it runs.
"""
from __future__ import annotations

import hashlib
import io
import pickle
import tarfile
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import torch

from shiftlab.trainers.config_checks import ConfigError
from shiftlab.trainers.data.base import TensorDataModule

URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
MD5 = "c58f30108f718f92721af3b95e74349a"
ARCHIVE = "cifar-10-python.tar.gz"
FOLDER = "cifar-10-batches-py"
TRAIN_FILES = [f"data_batch_{i}" for i in range(1, 6)]
TEST_FILES = ["test_batch"]
# md5 of each python batch of the official archive (the same table torchvision checks)
BATCH_MD5 = {
    "data_batch_1": "c99cafc152244af753f735de768cd75f",
    "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
    "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
    "data_batch_4": "634d18415352ddfa80567beed471001a",
    "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
    "test_batch": "40351d587109b95175f43aff81a1287e",
}
PIXELS = 3 * 32 * 32
MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)


class CIFAR10IntegrityError(ConfigError):
    """A CIFAR-10 file is damaged, tampered with, or not in the official format (one-line message;
    a :class:`ConfigError` so ``shiftlab-train`` reports it as bad input, exit 2, no traceback)."""


def md5sum(path: Path | io.BufferedIOBase) -> str:
    h = hashlib.md5()
    with (open(path, "rb") if isinstance(path, (str, Path)) else path) as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _numpy_multiarray() -> Any:
    try:
        from numpy._core import multiarray  # numpy >= 2
    except ImportError:  # numpy 1.x
        from numpy.core import multiarray  # type: ignore[no-redef]
    return multiarray


class BatchUnpickler(pickle.Unpickler):
    """Unpickles exactly what an official CIFAR-10 python batch holds: a dict of str/bytes keys,
    a uint8 numpy array, lists of ints and strings.

    Only numpy's array reconstruction globals resolve (the batches were pickled by Python 2
    numpy, hence ``numpy.core.multiarray``); any other global is refused before it is called.
    """

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"): lambda: _numpy_multiarray()._reconstruct,
        ("numpy._core.multiarray", "_reconstruct"): lambda: _numpy_multiarray()._reconstruct,
        ("numpy", "ndarray"): lambda: np.ndarray,
        ("numpy", "dtype"): lambda: _plain_dtype,
    }

    def find_class(self, module: str, name: str) -> Any:
        make = self._ALLOWED.get((module, name))
        if make is None:
            raise pickle.UnpicklingError(f"global {module}.{name} is not part of the CIFAR-10 batch format")
        return make()

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("persistent ids are not part of the CIFAR-10 batch format")


def _plain_dtype(spec: Any, *args: Any) -> np.dtype:
    """``numpy.dtype`` restricted to plain integer dtypes (the batches hold uint8 pixels)."""
    dtype = np.dtype(spec, *args)
    if dtype.kind not in "iu" or dtype.fields is not None:
        raise pickle.UnpicklingError(f"dtype {dtype} is not part of the CIFAR-10 batch format")
    return dtype


def load_batch(data: bytes, name: str = "batch") -> dict[str, Any]:
    """One python batch -> ``{"data": uint8 (n, 3072), "labels": int64 (n,)}``, refusing anything
    that is not the official format."""
    try:
        entry = BatchUnpickler(io.BytesIO(data), encoding="latin1").load()
    except Exception as e:  # noqa: BLE001 - pickle raises many types for hostile or damaged input
        raise CIFAR10IntegrityError(f"{name} is not a CIFAR-10 batch: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    if not isinstance(entry, dict):
        raise CIFAR10IntegrityError(f"{name} is not a CIFAR-10 batch: it holds a {type(entry).__name__}, not a dict")
    entry = {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in entry.items()}
    x, labels = entry.get("data"), entry.get("labels", entry.get("fine_labels"))
    if not isinstance(x, np.ndarray) or x.dtype != np.uint8 or x.ndim != 2 or x.shape[1] != PIXELS:
        raise CIFAR10IntegrityError(f"{name} is not a CIFAR-10 batch: 'data' must be a uint8 array of shape (n, {PIXELS})")
    if not isinstance(labels, (list, np.ndarray)) or len(labels) != len(x) or not all(
            isinstance(v, (int, np.integer)) and not isinstance(v, bool) and 0 <= v < 10 for v in labels):
        raise CIFAR10IntegrityError(f"{name} is not a CIFAR-10 batch: 'labels' must be {len(x)} integers in 0..9")
    return {"data": x, "labels": np.asarray(labels, dtype=np.int64)}


def expected_checksums(root: Path, md5: str | None) -> dict[str, str]:
    """The md5 each batch file must have.

    The official archive (``md5`` = :data:`MD5`): the published per-file table. Another archive
    (``data.url`` / ``data.md5`` set to your own): derived from the archive in ``root`` after its own
    md5 is checked, so the trust still comes from the configured ``data.md5``.
    """
    if md5 == MD5:
        return dict(BATCH_MD5)
    if not md5:
        raise CIFAR10IntegrityError("data.md5=null is not allowed; allowed: the archive's md5 (the batch files "
                                    "are checked against it on every load)")
    archive = root / ARCHIVE
    if not archive.exists():
        raise CIFAR10IntegrityError(f"data.md5={md5} is not the official archive's and {archive} is missing, so the "
                                    f"batch files cannot be checked; allowed: keep the archive in data.root")
    if md5sum(archive) != md5:
        raise CIFAR10IntegrityError(f"data.md5: {archive} has md5 {md5sum(archive)}, expected {md5}; "
                                    "delete it and download again")
    sums = {}
    with tarfile.open(archive, "r:gz") as tar:
        for name in TRAIN_FILES + TEST_FILES:
            member = tar.extractfile(f"{FOLDER}/{name}")
            if member is None:
                raise CIFAR10IntegrityError(f"{archive} has no {FOLDER}/{name}")
            sums[name] = md5sum(member)
    return sums


def download_and_extract(root: Path, url: str = URL, md5: str | None = MD5) -> Path:
    """Fetch the archive into ``root`` if missing, verify it and extract it; return the folder."""
    root.mkdir(parents=True, exist_ok=True)
    folder = root / FOLDER
    if (folder / TEST_FILES[0]).exists():
        return folder
    archive = root / ARCHIVE
    if not archive.exists():
        tmp = archive.with_suffix(".part")
        urllib.request.urlretrieve(url, tmp)
        tmp.rename(archive)
    if md5 and md5sum(archive) != md5:
        raise RuntimeError(f"data.md5: {archive} has md5 {md5sum(archive)}, expected {md5}; "
                           "delete it and download again")
    with tarfile.open(archive, "r:gz") as tar:
        tar.extractall(root, filter="data")
    return folder


def read_batches(folder: Path, names: list[str], checksums: dict[str, str]) -> tuple[np.ndarray, np.ndarray]:
    """Read batch files after checking each one's md5 against ``checksums``."""
    xs, ys = [], []
    for name in names:
        data = (folder / name).read_bytes()
        got = hashlib.md5(data).hexdigest()
        if got != checksums.get(name):
            raise CIFAR10IntegrityError(f"data.root: {folder / name} has md5 {got}, expected {checksums.get(name)} "
                                        f"(damaged or modified); delete {folder} to extract it again")
        entry = load_batch(data, str(folder / name))
        xs.append(entry["data"].reshape(-1, 3, 32, 32))
        ys.append(entry["labels"])
    return np.concatenate(xs), np.concatenate(ys)


class CIFAR10DataModule(TensorDataModule):
    """CIFAR-10, normalized with the usual channel mean / std; no augmentation (the setup of
    Santurkar et al. 2018 without augmentation)."""

    name = "cifar10"

    def __init__(self, root: str = "data/cifar10", url: str = URL, md5: str | None = MD5,
                 download: bool = True, **kwargs) -> None:
        kwargs.setdefault("standardize", False)
        super().__init__(**kwargs)
        self.root, self.url, self.md5, self.download = Path(root), url, md5, download

    def prepare_data(self) -> None:
        if self.download:
            download_and_extract(self.root, self.url, self.md5)

    def load(self) -> tuple:
        folder = self.root / FOLDER
        if not (folder / TEST_FILES[0]).exists():
            if not self.download:
                raise FileNotFoundError(f"data.root: no CIFAR-10 at {folder} and data.download=false")
            folder = download_and_extract(self.root, self.url, self.md5)
        checksums = expected_checksums(self.root, self.md5)
        x, y = read_batches(folder, TRAIN_FILES, checksums)
        xt, yt = read_batches(folder, TEST_FILES, checksums)
        mean = torch.tensor(MEAN).view(1, 3, 1, 1)
        std = torch.tensor(STD).view(1, 3, 1, 1)
        to_t = lambda a: (torch.from_numpy(a).float() / 255.0 - mean) / std  # noqa: E731
        self.num_classes = 10
        return to_t(x), torch.from_numpy(y), to_t(xt), torch.from_numpy(yt)
