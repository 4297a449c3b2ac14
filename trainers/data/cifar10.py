"""CIFAR-10 from the official python-pickle archive (the format torchvision reads).

Why our own loader: there is no CPU build of torchvision here, and the format is simple. The
archive is downloaded once into ``root`` (md5-checked) and read into memory as float tensors.
Offline, point ``data.url`` at a local ``file://`` archive or pre-place it in ``root``.
"""
from __future__ import annotations

import hashlib
import pickle
import tarfile
import urllib.request
from pathlib import Path

import numpy as np
import torch

from trainers.data.base import TensorDataModule

URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
MD5 = "c58f30108f718f92721af3b95e74349a"
ARCHIVE = "cifar-10-python.tar.gz"
FOLDER = "cifar-10-batches-py"
TRAIN_FILES = [f"data_batch_{i}" for i in range(1, 6)]
TEST_FILES = ["test_batch"]
MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)


def md5sum(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


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


def read_batches(folder: Path, names: list[str]) -> tuple[np.ndarray, np.ndarray]:
    xs, ys = [], []
    for name in names:
        with open(folder / name, "rb") as f:
            entry = pickle.load(f, encoding="latin1")
        xs.append(np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        ys.append(np.asarray(entry.get("labels", entry.get("fine_labels")), dtype=np.int64))
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
        x, y = read_batches(folder, TRAIN_FILES)
        xt, yt = read_batches(folder, TEST_FILES)
        mean = torch.tensor(MEAN).view(1, 3, 1, 1)
        std = torch.tensor(STD).view(1, 3, 1, 1)
        to_t = lambda a: (torch.from_numpy(a).float() / 255.0 - mean) / std  # noqa: E731
        self.num_classes = 10
        return to_t(x), torch.from_numpy(y), to_t(xt), torch.from_numpy(yt)
