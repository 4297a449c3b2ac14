"""Data modules: label noise rate and seeding, splits, offline generation, CIFAR-10 archive code."""
from __future__ import annotations

import hashlib
import os
import pickle
import struct
import tarfile

import numpy as np
import pytest
import torch

from shiftlab.trainers.data import CIFAR10DataModule, DigitsDataModule, MNIST1DDataModule, SyntheticDataModule
from shiftlab.trainers.data.label_noise import corrupt_labels


@pytest.mark.parametrize("rate", [0.0, 0.2, 0.4, 0.6])
def test_label_noise_hits_the_requested_rate(rate):
    y = torch.arange(1000) % 10
    noisy, mask = corrupt_labels(y, rate, 10, seed=3)
    assert mask.sum().item() == round(rate * 1000)
    assert torch.equal(noisy != y, mask)  # every corrupted label really changed, nothing else did
    assert noisy.min() >= 0 and noisy.max() < 10


def test_label_noise_is_seeded():
    y = torch.arange(500) % 7
    a, ma = corrupt_labels(y, 0.3, 7, seed=1)
    b, mb = corrupt_labels(y, 0.3, 7, seed=1)
    c, mc = corrupt_labels(y, 0.3, 7, seed=2)
    assert torch.equal(a, b) and torch.equal(ma, mb)
    assert not torch.equal(ma, mc)


def test_label_noise_rejects_out_of_range():
    with pytest.raises(ValueError, match="data.label_noise"):
        corrupt_labels(torch.zeros(3, dtype=torch.long), 1.0, 2, 0)


def test_datamodule_records_corruption_and_is_seeded():
    a, b = DigitsDataModule(label_noise=0.4, seed=5), DigitsDataModule(label_noise=0.4, seed=5)
    a.setup(), b.setup()
    ts = a.train_set
    assert torch.equal(ts.y != ts.y_true, ts.corrupted)
    assert abs(ts.corrupted.float().mean().item() - 0.4) < 1e-3
    assert torch.equal(ts.x, b.train_set.x) and torch.equal(ts.y, b.train_set.y)
    n = len(a.train_set) + len(a.val_set) + len(a.test_set)
    assert n == 1797


def test_train_order_depends_only_on_seed_and_epoch():
    dm = DigitsDataModule(batch_size=32, seed=1)
    dm.setup()
    first = [b[1] for b in dm.train_dataloader()]
    loader = dm.train_dataloader()
    loader.sampler.set_epoch(0)
    again = [b[1] for b in loader]
    loader.sampler.set_epoch(1)
    other = [b[1] for b in loader]
    assert all(torch.equal(p, q) for p, q in zip(first, again))
    assert not all(torch.equal(p, q) for p, q in zip(first, other))


def test_mnist1d_is_generated_without_writing_files(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    dm = MNIST1DDataModule(seed=0)
    dm.setup()
    assert list(tmp_path.iterdir()) == []
    assert dm.input_shape == (1, 40) and dm.num_classes == 10
    assert len(dm.test_set) == 1000


def test_synthetic_kinds():
    for kind in ("clusters", "teacher"):
        dm = SyntheticDataModule(kind=kind, num_samples=300, dim=6, num_classes=3)
        dm.setup()
        assert dm.input_shape == (6,) and dm.num_classes == 3
    with pytest.raises(ValueError, match="data.kind"):
        SyntheticDataModule(kind="spiral")


def write_tiny_cifar(root, per_file: int = 6) -> tuple[str, str]:
    """A CIFAR-10-format archive (python pickles in cifar-10-batches-py/), returned as (url, md5).

    Same content types as the official batches: a dict with a uint8 (n, 3072) array, a list of int
    labels, a batch label and file names (pickled by Python 3, so protocol 4 instead of 2)."""
    rng = np.random.default_rng(0)
    folder = root / "src" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        entry = {"batch_label": f"{name} of 6", "labels": rng.integers(0, 10, size=per_file).tolist(),
                 "data": rng.integers(0, 256, size=(per_file, 3072), dtype=np.uint8),
                 "filenames": [f"img_{i}.png" for i in range(per_file)]}
        with open(folder / name, "wb") as f:
            pickle.dump(entry, f, protocol=4)
    archive = root / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname="cifar-10-batches-py")
    return archive.as_uri(), hashlib.md5(archive.read_bytes()).hexdigest()


def test_cifar10_download_extract_and_load(tmp_path):
    url, md5 = write_tiny_cifar(tmp_path)
    dm = CIFAR10DataModule(root=str(tmp_path / "data"), url=url, md5=md5, val_fraction=0.2, seed=0)
    dm.prepare_data()
    dm.setup()
    assert dm.input_shape == (3, 32, 32) and dm.num_classes == 10
    assert len(dm.train_set) + len(dm.val_set) == 30 and len(dm.test_set) == 6
    assert abs(dm.train_set.x.mean().item()) < 3  # normalized


def test_cifar10_md5_mismatch_is_reported(tmp_path):
    url, _ = write_tiny_cifar(tmp_path)
    dm = CIFAR10DataModule(root=str(tmp_path / "data"), url=url, md5="0" * 32)
    with pytest.raises(RuntimeError, match="data.md5"):
        dm.prepare_data()
    assert not os.path.exists(tmp_path / "data" / "cifar-10-batches-py")


# --------------------------------------------------------------------------------------------
# finding 8: batch files are checked on every load and unpickled with an allow-list
# --------------------------------------------------------------------------------------------
class _RunsCommand:
    """Unpickling this would call os.system(command)."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def _tiny_dm(tmp_path):
    url, md5 = write_tiny_cifar(tmp_path)
    dm = CIFAR10DataModule(root=str(tmp_path / "data"), url=url, md5=md5, val_fraction=0.2, seed=0)
    dm.prepare_data()
    return dm, tmp_path / "data" / "cifar-10-batches-py"


def test_cifar10_tampered_batch_in_an_existing_folder_is_refused(tmp_path):
    from shiftlab.trainers.config_checks import ConfigError
    from shiftlab.trainers.data.cifar10 import CIFAR10IntegrityError

    dm, folder = _tiny_dm(tmp_path)
    dm.setup()  # intact: loads
    batch = folder / "data_batch_3"
    raw = bytearray(batch.read_bytes())
    raw[-20] ^= 0xFF  # one pixel byte changed: still a valid pickle
    batch.write_bytes(bytes(raw))
    again = CIFAR10DataModule(root=str(tmp_path / "data"), url="file:///nonexistent", md5=dm.md5)
    again.prepare_data()  # the folder exists: no download, no archive check here
    with pytest.raises(CIFAR10IntegrityError) as err:
        again.setup()
    msg = str(err.value)
    assert isinstance(err.value, ConfigError) and "\n" not in msg
    assert msg.startswith(f"data.root: {batch} has md5 {hashlib.md5(bytes(raw)).hexdigest()}, expected ")


def test_cifar10_official_archive_uses_the_published_checksums(tmp_path):
    from shiftlab.trainers.data.cifar10 import BATCH_MD5, MD5, CIFAR10IntegrityError, expected_checksums

    assert expected_checksums(tmp_path, MD5) == BATCH_MD5  # no archive needed for the official one
    _, folder = _tiny_dm(tmp_path)
    dm = CIFAR10DataModule(root=str(tmp_path / "data"), md5=MD5, download=False)
    with pytest.raises(CIFAR10IntegrityError, match="data_batch_1 has md5 .*, expected c99cafc152244af753f735de768cd75f"):
        dm.setup()  # our tiny batches are not the official ones
    with pytest.raises(CIFAR10IntegrityError, match="data.md5=null is not allowed"):
        CIFAR10DataModule(root=str(tmp_path / "data"), md5=None, download=False).setup()


def test_cifar10_malicious_pickle_is_refused_without_running(tmp_path):
    from shiftlab.trainers.data.cifar10 import CIFAR10IntegrityError, load_batch

    marker = tmp_path / "pwned"
    payload = pickle.dumps({"data": _RunsCommand(f"touch {marker}"), "labels": [0]})
    with pytest.raises(CIFAR10IntegrityError, match="global posix.system is not part of the CIFAR-10 batch format"):
        load_batch(payload, "evil")
    assert not marker.exists()
    # the same payload as a batch file whose checksum matches (an attacker who also controls the
    # archive): refused by the unpickler, nothing runs
    dm, folder = _tiny_dm(tmp_path)
    (folder / "test_batch").write_bytes(payload)
    from shiftlab.trainers.data import cifar10

    sums = {name: hashlib.md5((folder / name).read_bytes()).hexdigest() for name in cifar10.BATCH_MD5}
    with pytest.raises(CIFAR10IntegrityError, match="test_batch is not a CIFAR-10 batch: global posix.system"):
        cifar10.read_batches(folder, ["test_batch"], sums)
    assert not marker.exists()


@pytest.mark.parametrize("entry, needle", [
    ([1, 2, 3], "holds a list, not a dict"),
    ({"data": np.zeros((2, 3072), np.float32), "labels": [0, 1]}, "dtype float32 is not part of the CIFAR-10"),
    ({"data": np.zeros((2, 3072), object), "labels": [0, 1]}, "dtype object is not part"),
    ({"data": np.zeros((2, 100), np.uint8), "labels": [0, 1]}, "'data' must be a uint8 array of shape (n, 3072)"),
    ({"data": np.zeros((2, 3072), np.uint8), "labels": [0, 10]}, "'labels' must be 2 integers in 0..9"),
    ({"data": np.zeros((2, 3072), np.uint8), "labels": [0]}, "'labels' must be 2 integers in 0..9"),
    ({"data": np.zeros((2, 3072), np.uint8), "labels": [0, 1], "x": complex(1, 2)}, "global builtins.complex"),
])
def test_cifar10_unpickler_accepts_only_the_official_format(entry, needle):
    from shiftlab.trainers.data.cifar10 import CIFAR10IntegrityError, load_batch

    with pytest.raises(CIFAR10IntegrityError) as err:
        load_batch(pickle.dumps(entry, protocol=4), "b")
    assert needle in str(err.value) and "\n" not in str(err.value)
    ok = load_batch(pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [3, 4]}, protocol=3), "b")
    assert ok["labels"].tolist() == [3, 4] and ok["data"].shape == (2, 3072)


def _python2_batch(data: np.ndarray, labels: list[int]) -> bytes:
    """A batch byte for byte as Python 2's cPickle (protocol 2) writes the official ones: py2 str as
    BINSTRING, numpy globals under ``numpy.core.multiarray``."""
    def s(b: bytes) -> bytes:
        return (b"U" + bytes([len(b)]) + b) if len(b) < 256 else (b"T" + struct.pack("<i", len(b)) + b)

    def i(v: int) -> bytes:
        return b"K" + bytes([v]) if 0 <= v < 256 else b"J" + struct.pack("<i", v)

    out = [b"\x80\x02}(", s(b"data"), b"cnumpy.core.multiarray\n_reconstruct\n", b"cnumpy\nndarray\n", i(0),
           b"\x85", s(b"b"), b"\x87R(", i(1), i(data.shape[0]), i(data.shape[1]), b"\x86", b"cnumpy\ndtype\n",
           s(b"u1"), i(0), i(1), b"\x87R(", i(3), s(b"|"), b"NNN", i(-1), i(-1), i(0), b"tb\x89", s(data.tobytes()),
           b"tb", s(b"labels"), b"](", *[i(v) for v in labels], b"e", s(b"batch_label"), s(b"training batch 1 of 5"),
           b"u."]
    return b"".join(out)


def test_cifar10_python2_batch_format_loads():
    from shiftlab.trainers.data.cifar10 import load_batch

    x = np.arange(3 * 3072, dtype=np.uint8).reshape(3, 3072)
    raw = _python2_batch(x, [3, 7, 0])
    assert np.array_equal(pickle.loads(raw, encoding="latin1")["data"], x)  # what torchvision would read
    batch = load_batch(raw, "py2")
    assert np.array_equal(batch["data"], x) and batch["labels"].tolist() == [3, 7, 0]
