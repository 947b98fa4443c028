"""Data sets and the batch iterator: digits layout, IDX/MNIST reading, seeded shuffle, resume."""

from itertools import islice

import numpy as np
import pytest
from _idx import tiny_mnist, write_idx
from _paths import MNIST_DIR

from jaxmodels.data.datasets import get_dataset, list_datasets, load_mnist, upsample_digits
from jaxmodels.data.mnist import read_idx
from jaxmodels.training.batches import BatchIterator, Position

MNIST_TEST_FILES = ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def _has_mnist_test() -> bool:
    return all(
        any((MNIST_DIR / (n + ext)).is_file() for ext in ("", ".gz")) for n in MNIST_TEST_FILES
    )


needs_mnist = pytest.mark.skipif(
    not _has_mnist_test(), reason=f"MNIST test files not found in {MNIST_DIR.resolve()}"
)


@pytest.fixture(scope="module")
def digits():
    return get_dataset("digits")


# --------------------------------------------------------------------------------------- digits


def test_digits_shapes_split_and_range(digits):
    assert (digits.task, digits.num_classes, digits.input_shape) == (
        "classification",
        10,
        (28, 28, 1),
    )
    assert digits.x_train.shape == (1437, 28, 28, 1) and digits.x_test.shape == (360, 28, 28, 1)
    assert digits.x_train.dtype == np.float32 and digits.y_train.dtype == np.int32
    assert digits.x_train.min() == 0.0 and digits.x_train.max() <= 1.0
    assert np.array_equal(np.bincount(digits.y_test), np.bincount(digits.y_test, minlength=10))
    assert np.bincount(digits.y_test).min() >= 35  # stratified: 35-37 of each class
    # the 4-pixel margin of the 28x28 canvas is empty, as in MNIST
    assert np.all(digits.x_train[:, :4] == 0) and np.all(digits.x_train[:, -4:] == 0)


def test_digits_split_is_fixed_by_seed(digits):
    again = get_dataset("digits")
    assert np.array_equal(again.x_train, digits.x_train) and np.array_equal(
        again.y_test, digits.y_test
    )
    other = get_dataset("digits", seed=1)
    assert not np.array_equal(other.y_train, digits.y_train)


def _bilinear_reference(image: np.ndarray, size: int) -> np.ndarray:
    """Half-pixel-centred bilinear resize with clamped edges, a numpy loop-free reference."""
    n = image.shape[0]
    pos = np.clip((np.arange(size) + 0.5) * n / size - 0.5, 0, n - 1)
    lo = np.floor(pos).astype(int)
    hi = np.minimum(lo + 1, n - 1)
    frac = pos - lo
    rows = image[lo] * (1 - frac)[:, None] + image[hi] * frac[:, None]  # [size, n]
    return rows[:, lo] * (1 - frac)[None, :] + rows[:, hi] * frac[None, :]


def test_upsample_digits_is_bilinear_and_centred():
    from sklearn.datasets import load_digits

    images = load_digits().images[:5].astype(np.float32) / 16
    out = upsample_digits(images)
    assert out.shape == (5, 28, 28, 1)
    for image, up in zip(images, out):
        np.testing.assert_allclose(up[4:24, 4:24, 0], _bilinear_reference(image, 20), atol=1e-5)
    with pytest.raises(ValueError, match="even margin"):
        upsample_digits(images, size=21)


def test_digits_examples_come_from_upsampled_sklearn_images(digits):
    from sklearn.datasets import load_digits

    bunch = load_digits()
    up = upsample_digits(bunch.images.astype(np.float32) / 16)
    match = np.flatnonzero(np.all(np.abs(up - digits.x_test[0]) < 1e-6, axis=(1, 2, 3)))
    assert match.size >= 1 and bunch.target[match[0]] == digits.y_test[0]


# ---------------------------------------------------------------------------------------- MNIST


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gzip"])
def test_mnist_reads_tiny_idx_files(tmp_path, gz):
    arrays = tiny_mnist(tmp_path, gz)
    ds = load_mnist(tmp_path)
    for (x, y), (images, labels) in zip(
        [(ds.x_train, ds.y_train), (ds.x_test, ds.y_test)], arrays.values()
    ):
        assert x.shape == (len(images), 28, 28, 1) and x.dtype == np.float32 and y.dtype == np.int32
        np.testing.assert_allclose(x[..., 0] * 255, images, atol=1e-4)
        np.testing.assert_array_equal(y, labels)


def test_mnist_reads_only_the_splits_present_and_finds_the_env_folder(tmp_path, monkeypatch):
    tiny_mnist(tmp_path / "mnist", gz=True, splits=("test",))
    monkeypatch.setenv("JAXMODELS_DATA", str(tmp_path))  # the parent; the mnist/ subfolder is found
    ds = get_dataset("mnist")
    assert ds.x_train is None and ds.y_train is None and ds.x_test.shape == (3, 28, 28, 1)
    assert "train=absent" in repr(ds)


def test_read_idx_other_dtypes_and_bad_files(tmp_path):
    values = np.arange(24, dtype=np.int32).reshape(2, 3, 4) - 5
    write_idx(tmp_path / "ints.idx", values, 0x0C)
    np.testing.assert_array_equal(read_idx(tmp_path / "ints.idx"), values)
    (tmp_path / "bad.idx").write_bytes(b"\x01\x02\x03\x04")
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(tmp_path / "bad.idx")
    (tmp_path / "short.idx").write_bytes((tmp_path / "ints.idx").read_bytes()[:-4])
    with pytest.raises(ValueError, match=r"header says shape \(2, 3, 4\)"):
        read_idx(tmp_path / "short.idx")


def test_mnist_errors_name_the_folder_and_the_files(tmp_path, monkeypatch):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match="nowhere does not exist"):
        load_mnist(missing)
    with pytest.raises(
        FileNotFoundError, match=r"no MNIST files in .*t10k-images-idx3-ubyte\[\.gz\]"
    ):
        load_mnist(tmp_path)
    monkeypatch.delenv("JAXMODELS_DATA", raising=False)
    with pytest.raises(FileNotFoundError, match="JAXMODELS_DATA"):
        load_mnist()
    write_idx(tmp_path / "t10k-images-idx3-ubyte", np.zeros((2, 28, 28), np.uint8), 0x08)
    with pytest.raises(FileNotFoundError, match="missing t10k-labels-idx1-ubyte"):
        load_mnist(tmp_path)


@needs_mnist
def test_mnist_real_test_split():
    ds = get_dataset("mnist", data_dir=MNIST_DIR)
    assert ds.x_test.shape == (10000, 28, 28, 1) and ds.x_test.dtype == np.float32
    assert ds.x_test.min() == 0.0 and ds.x_test.max() == 1.0
    assert ds.y_test[:10].tolist() == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]
    assert np.bincount(ds.y_test).tolist() == [
        980,
        1135,
        1032,
        1010,
        982,
        892,
        958,
        1028,
        974,
        1009,
    ]


def test_unknown_dataset_names_the_choices():
    with pytest.raises(
        ValueError, match=r"unknown dataset 'cifar'; expected one of \('digits', 'mnist'"
    ):
        get_dataset("cifar")
    assert set(list_datasets()) >= {"digits", "mnist"}
    with pytest.raises(TypeError, match="bad options for dataset 'digits'"):
        get_dataset("digits", data_dir="/tmp")


# ------------------------------------------------------------------------------------- batching


def _data(n=10):
    return np.arange(n, dtype=np.float32)[:, None] * np.ones((1, 3), np.float32), np.arange(
        n, dtype=np.int32
    )


def _epoch_ids(it):
    return [b["y"].tolist() for b in it.epoch()]


def test_seeded_shuffle_is_reproducible_and_differs_by_epoch_and_seed():
    a, b, c = (BatchIterator(_data(), 3, seed=s) for s in (7, 7, 8))
    first_a, first_b, first_c = _epoch_ids(a), _epoch_ids(b), _epoch_ids(c)
    assert first_a == first_b and first_a != first_c
    assert _epoch_ids(a) != first_a  # the next epoch has another order
    assert a.position == Position(2, 0)
    unshuffled = BatchIterator(_data(), 3, shuffle=False)
    assert _epoch_ids(unshuffled) == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]


@pytest.mark.parametrize(
    "remainder, sizes, masked",
    [("drop", [3, 3, 3], 9), ("keep", [3, 3, 3, 1], 10), ("pad", [3, 3, 3, 3], 10)],
)
def test_remainder_policies(remainder, sizes, masked):
    it = BatchIterator(_data(), 3, seed=0, remainder=remainder)
    batches = list(it.epoch())
    assert [len(b["y"]) for b in batches] == sizes and it.steps_per_epoch == len(sizes)
    assert sum(float(b["mask"].sum()) for b in batches) == masked
    real = np.concatenate([b["y"][b["mask"] > 0] for b in batches])
    assert len(set(real.tolist())) == masked  # every counted example is distinct
    assert all(b["x"].shape == (len(b["y"]), 3) and b["mask"].dtype == np.float32 for b in batches)


def test_position_resumes_mid_epoch_and_at_epoch_end():
    full = BatchIterator(_data(), 4, seed=3, remainder="pad")
    reference = [b["y"].tolist() for b in islice(full, 8)]  # 3 steps/epoch: crosses 2 epochs
    for stop in (2, 3, 5):
        it = BatchIterator(_data(), 4, seed=3, remainder="pad")
        seen = [b["y"].tolist() for b in islice(it, stop)]
        saved = it.position
        resumed = BatchIterator(_data(), 4, seed=3, remainder="pad")
        resumed.restore(saved._asdict() if stop == 5 else tuple(saved))
        rest = [b["y"].tolist() for b in islice(resumed, 8 - stop)]
        assert seen + rest == reference, stop
    assert full.position == Position(2, 2)
    with pytest.raises(ValueError, match="0 <= step <= 3"):
        full.restore(Position(0, 4))


@pytest.mark.parametrize("bad", [0, -2, 2.5, True, "8"])
def test_bad_batch_sizes(bad):
    with pytest.raises(ValueError, match="expected a positive integer batch size"):
        BatchIterator(_data(), bad)


def test_batch_larger_than_data():
    with pytest.raises(ValueError, match="batch size 11 is larger than the 10 examples"):
        BatchIterator(_data(), 11, remainder="drop")
    it = BatchIterator(_data(), 11, remainder="pad")
    (batch,) = list(it.epoch())
    assert len(batch["y"]) == 11 and batch["mask"].sum() == 10
    with pytest.raises(ValueError, match="unknown remainder policy 'round'"):
        BatchIterator(_data(), 2, remainder="round")
