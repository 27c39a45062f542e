"""Data sets: fixed splits, standardisation, and the CIFAR-10 loader on a fixture written here."""

import hashlib
import io
import tarfile

import numpy as np
import pytest
import torch

from qlib import data


def test_mnist5k_split_is_fixed_stratified_and_disjoint():
    d = data.load_mnist5k()
    assert d.x_train.shape == (3500, 1, 28, 28) and d.x_test.shape == (1000, 1, 28, 28)
    assert d.x_val.shape == (500, 1, 28, 28)
    assert torch.bincount(d.y_test).tolist() == [100] * 10
    assert torch.bincount(d.y_val).tolist() == [50] * 10
    assert torch.bincount(d.y_train).tolist() == [350] * 10
    again = data.load_mnist5k()
    assert torch.equal(d.x_test, again.x_test) and torch.equal(d.x_val, again.x_val)
    # no image is in two splits
    rows = {name: {r.tobytes() for r in x.reshape(len(x), -1).numpy()}
            for name, x in (("train", d.x_train), ("val", d.x_val), ("test", d.x_test))}
    assert not rows["train"] & rows["test"] and not rows["train"] & rows["val"] and not rows["val"] & rows["test"]
    # standardised with the training statistics
    assert abs(d.x_train.mean().item()) < 1e-5 and abs(d.x_train.std().item() - 1) < 1e-4


def test_digits_split():
    d = data.load_digits()
    assert d.x_train.shape[1:] == (1, 8, 8)
    assert len(d.x_train) + len(d.x_val) + len(d.x_test) == 1797
    assert abs(len(d.x_test) - 0.2 * 1797) < 10 and abs(len(d.x_val) - 0.1 * 1797) < 10


def test_mnist1d_keeps_the_canonical_training_set_and_extends_the_test_set():
    from mnist1d.data import get_dataset_args, make_dataset

    d = data.load_mnist1d()
    assert d.x_train.shape == (4000, 1, 40) and d.x_test.shape == (10_000, 1, 40) and d.x_val.shape == (2000, 1, 40)
    canonical = make_dataset(get_dataset_args())           # the package's own 4,000 / 1,000 split
    x = torch.tensor(canonical["x"][:, None, :], dtype=torch.float32)
    assert torch.allclose((x - x.mean()) / x.std(), d.x_train, atol=1e-5)
    assert torch.equal(d.y_train, torch.tensor(canonical["y"])) and torch.equal(d.y_test[:1000],
                                                                               torch.tensor(canonical["y_test"]))
    xt = torch.tensor(canonical["x_test"][:, None, :], dtype=torch.float32)
    assert torch.allclose((xt - x.mean()) / x.std(), d.x_test[:1000], atol=1e-5)   # same units as training
    assert all(950 <= n <= 1050 for n in torch.bincount(d.y_test).tolist())   # the canonical 1,000 are shuffled
    assert torch.bincount(d.y_val).tolist() == [200] * 10
    small = data.load_mnist1d(n_train=400, n_test=300, n_val=0)
    assert small.x_train.shape == (400, 1, 40) and small.x_test.shape == (300, 1, 40) and len(small.x_val) == 0
    assert torch.equal(data.load_mnist1d(n_test=2000).x_train, d.x_train)    # the test size leaves training alone
    with pytest.raises(ValueError, match="no val split"):
        small.split("val")


def test_mnist1d_leaves_global_random_state_alone():
    np.random.seed(123)
    expected = np.random.rand()
    np.random.seed(123)
    data.load_mnist1d(n_train=100, n_test=100)
    assert np.random.rand() == expected


def test_mnist1d_is_cached_and_the_cached_copy_equals_a_fresh_draw(tmp_path, monkeypatch):
    monkeypatch.setenv("QLIB_CACHE_DIR", str(tmp_path))
    first = data.load_mnist1d(n_train=100, n_test=50, n_val=20)
    files = list((tmp_path / "data").glob("mnist1d-*.pt"))
    assert len(files) == 1
    again = data.load_mnist1d(n_train=100, n_test=50, n_val=20)          # from the cache
    fresh = data._generate_mnist1d(100, 50, 20, 42)
    for split in ("train", "val", "test"):
        for part in ("x", "y"):
            name = f"{part}_{split}"
            assert torch.equal(getattr(again, name), getattr(first, name))
            assert torch.equal(getattr(fresh, name), getattr(first, name))
    data.load_mnist1d(n_train=100, n_test=60, n_val=20)                   # other arguments, other file
    assert len(list((tmp_path / "data").glob("mnist1d-*.pt"))) == 2


def test_batches_cover_everything_once():
    d = data.load_digits()
    seen = torch.cat([y for _, y in d.train_batches(100, torch.Generator().manual_seed(0))])
    assert torch.equal(seen.sort().values, d.y_train.sort().values)
    sizes = [len(x) for x, _ in d.test_batches(100)]
    assert sum(sizes) == len(d.x_test) and sizes[0] == 100


def write_cifar_fixture(root, records_per_file=7, seed=0):
    """A tiny CIFAR-10 in the real binary format: a .tar.gz with the six batch files."""
    rng = np.random.default_rng(seed)
    names = list(data.CIFAR10_TRAIN_FILES + data.CIFAR10_TEST_FILES)
    contents = {}
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name in names:
            labels = rng.integers(0, 10, records_per_file, dtype=np.uint8)
            pixels = rng.integers(0, 256, (records_per_file, 3072), dtype=np.uint8)
            blob = np.concatenate([labels[:, None], pixels], axis=1).tobytes()
            contents[name] = (labels, pixels)
            info = tarfile.TarInfo(f"{data.CIFAR10_DIR}/{name}")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    archive = root / "fixture.tar.gz"
    archive.write_bytes(buffer.getvalue())
    return archive, hashlib.md5(buffer.getvalue()).hexdigest(), contents


def test_cifar10_not_downloaded_without_permission(tmp_path):
    with pytest.raises(FileNotFoundError, match="Pass download=True"):
        data.load_cifar10(tmp_path / "nowhere")


def test_cifar10_download_checksum_and_parse(tmp_path):
    archive, md5, contents = write_cifar_fixture(tmp_path)
    root = tmp_path / "cifar"
    d = data.load_cifar10(root, download=True, url=archive.as_uri(), md5=md5)
    assert d.x_train.shape == (35, 3, 32, 32) and d.x_test.shape == (7, 3, 32, 32)
    labels, pixels = contents["test_batch.bin"]
    assert d.y_test.tolist() == labels.tolist()
    # undo the per-channel standardisation: the pixels come back exactly
    restored = torch.round((d.x_test * d.std + d.mean) * 255).to(torch.int64)
    assert torch.equal(restored.reshape(7, -1), torch.from_numpy(pixels.astype(np.int64)))
    # a second load reads the extracted files without downloading
    assert torch.equal(data.load_cifar10(root).x_test, d.x_test)


def test_cifar10_checksum_mismatch(tmp_path):
    archive, _, _ = write_cifar_fixture(tmp_path)
    with pytest.raises(ValueError, match="checksum mismatch"):
        data.load_cifar10(tmp_path / "cifar", download=True, url=archive.as_uri(), md5="0" * 32)
    assert not (tmp_path / "cifar" / "cifar-10-binary.tar.gz").exists()


def test_cifar10_corrupt_file(tmp_path):
    bad = tmp_path / "bad.bin"
    bad.write_bytes(b"\x00" * 100)
    with pytest.raises(ValueError, match="not a CIFAR-10 binary batch"):
        data.read_cifar10_file(bad)


def test_random_crop_flip_keeps_content():
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).reshape(2, 3, 8, 8)
    out = data.random_crop_flip(x, padding=0, generator=torch.Generator().manual_seed(0))
    for i in range(2):  # with no padding, each image is itself or its mirror image
        assert torch.equal(out[i], x[i]) or torch.equal(out[i], x[i].flip(-1))
    padded = data.random_crop_flip(x, padding=2, generator=torch.Generator().manual_seed(1))
    assert padded.shape == x.shape


def test_bad_arguments():
    with pytest.raises(ValueError, match="n_train, n_test and n_val must be multiples of 10"):
        data.load_mnist1d(n_train=105)
    with pytest.raises(ValueError, match="name must be one of"):
        data.load("imagenet")
    with pytest.raises(ValueError, match="test_per_class must be in"):
        data.load_mnist5k(test_per_class=0)
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        next(data.iterate_batches(torch.zeros(2), torch.zeros(2), 0))


def test_dataset_shape_and_classes():
    digits = data.load_digits()
    assert digits.input_shape == (1, 8, 8) == tuple(digits.x_test.shape[1:])
    assert digits.num_classes == 10 == int(digits.y_train.max()) + 1
    assert data.load_mnist1d(n_train=100, n_test=20).input_shape == (1, 40)


def test_calibration_batches_are_a_fixed_sample_of_the_training_set():
    ds = data.load_digits()
    batches = ds.calibration_batches(250, batch_size=100)
    assert [len(b) for b in batches] == [100, 100, 50]
    again = ds.calibration_batches(250, batch_size=100)
    assert all(torch.equal(a, b) for a, b in zip(batches, again))          # the same images every time
    sample = torch.cat(batches)
    train = {tuple(row.tolist()) for row in ds.x_train.flatten(1)}
    assert all(tuple(row.tolist()) in train for row in sample.flatten(1))  # training images only
    assert len({tuple(row.tolist()) for row in sample.flatten(1)}) == 250  # no repeats
    assert not torch.equal(torch.cat(ds.calibration_batches(250, seed=1)), sample)
    assert sum(len(b) for b in ds.calibration_batches(10_000)) == len(ds.x_train)
    pairs = ds.calibration_batches(250, batch_size=100, labels=True)
    assert all(torch.equal(x, b) for (x, _), b in zip(pairs, batches))  # the same images, with their labels
    rows = {tuple(row.tolist()): int(label) for row, label in zip(ds.x_train.flatten(1), ds.y_train)}
    assert all(rows[tuple(r.tolist())] == int(l) for x, y in pairs for r, l in zip(x.flatten(1), y))
    with pytest.raises(ValueError, match="images must be"):
        ds.calibration_batches(0)


def test_standardisation_does_not_depend_on_the_thread_count():
    # float32 reductions in torch sum in a thread-dependent order: the statistics must not
    rng = np.random.default_rng(3)
    x = rng.standard_normal((4000, 1, 40)).astype(np.float32)  # mean near 0: sums cancel
    y = rng.integers(0, 10, 4000)
    threads = torch.get_num_threads()
    try:
        stats = []
        for n in (1, 2, 4):
            torch.set_num_threads(n)
            d = data._standardise("toy", x, y, x[:10], y[:10], tuple("0123456789"))
            stats.append((d.mean.item(), d.std.item(), d.x_test.numpy().tobytes()))
    finally:
        torch.set_num_threads(threads)
    assert stats[0] == stats[1] == stats[2]
    x64 = x.astype(np.float64)
    assert stats[0][0] == np.float32(x64.mean()) and stats[0][1] == np.float32(x64.std(ddof=1))
    # per channel: one statistic per channel, over examples and positions
    images = rng.random((50, 3, 4, 4)).astype(np.float32)
    d = data._standardise("rgb", images, y[:50], images[:5], y[:5], tuple("0123456789"), per_channel=True)
    assert d.mean.shape == (1, 3, 1, 1)
    np.testing.assert_array_equal(d.mean.numpy().ravel(),
                                  images.astype(np.float64).mean(axis=(0, 2, 3)).astype(np.float32))
