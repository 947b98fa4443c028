"""Sequence and text data sets (seq-mnist, seq-digits, adding, copy, text) and the MNIST downloader:
layouts, determinism, targets checked against independent computations, and a few training steps
of each with its registry model through ``jaxmodels.training.fit.fit``."""

import dataclasses
import gzip
import hashlib
import math
import shutil
import socket

import jax.numpy as jnp
import numpy as np
import pytest
from _paths import MNIST_DIR, SHARED_DATA

from jaxmodels.data import mnist
from jaxmodels.data.datasets import get_dataset, list_datasets, load_mnist
from jaxmodels.data.mnist import MNIST_SHA256, download_mnist
from jaxmodels.nn.models import get_model
from jaxmodels.training.fit import TrainConfig, fit
from jaxmodels.training.steps import language_model_loss

SHAKESPEARE = SHARED_DATA / "tinyshakespeare" / "input.txt"
MNIST_TEST_FILES = ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")

needs_mnist = pytest.mark.skipif(
    not all((MNIST_DIR / n).is_file() for n in MNIST_TEST_FILES),
    reason=f"MNIST test files ({', '.join(MNIST_TEST_FILES)}) not found in {MNIST_DIR.resolve()}",
)
needs_shakespeare = pytest.mark.skipif(
    not SHAKESPEARE.is_file(), reason=f"Tiny Shakespeare not found at {SHAKESPEARE.resolve()}"
)


def test_registry_lists_the_new_data_sets():
    assert {"seq-mnist", "seq-digits", "adding", "copy", "text"} <= set(list_datasets())


# ------------------------------------------------------------------------------ sequential images


@pytest.fixture(scope="module")
def digits():
    return get_dataset("digits")


@pytest.fixture(scope="module")
def seq_digits():
    return get_dataset("seq-digits")


def test_seq_digits_are_the_digits_images_row_by_row(digits, seq_digits):
    ds = seq_digits
    assert (ds.name, ds.task, ds.num_classes, ds.input_shape) == (
        "seq-digits",
        "classification",
        10,
        (28, 28),
    )
    assert ds.x_train.shape == (1437, 28, 28) and ds.x_test.shape == (360, 28, 28)
    assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int32
    # time step t is image row t, feature w its pixel w
    np.testing.assert_array_equal(ds.x_train, digits.x_train[..., 0])
    np.testing.assert_array_equal(ds.y_test, digits.y_test)
    np.testing.assert_array_equal(ds.x_test[5, 13], digits.x_test[5, 13, :, 0])


def test_seq_pixels_and_a_fixed_permutation(digits):
    pixels = get_dataset("seq-digits", steps="pixels")
    assert pixels.x_train.shape == (1437, 784, 1) and pixels.input_shape == (784, 1)
    np.testing.assert_array_equal(pixels.x_train[3, 28 * 10 + 7, 0], digits.x_train[3, 10, 7, 0])
    permuted = get_dataset("seq-digits", steps="pixels", permute=7)
    order = np.random.default_rng(7).permutation(784)
    np.testing.assert_array_equal(permuted.x_train, pixels.x_train[:, order])
    np.testing.assert_array_equal(
        permuted.x_test, pixels.x_test[:, order]
    )  # same permutation for both splits
    assert permuted.info["permute"] == 7
    with pytest.raises(ValueError, match="steps"):
        get_dataset("seq-digits", steps="columns")


@needs_mnist
def test_seq_mnist_on_the_real_test_split():
    ds = get_dataset("seq-mnist", data_dir=SHARED_DATA)
    mnist = load_mnist(SHARED_DATA)
    assert ds.x_test.shape == (10_000, 28, 28) and ds.x_test.dtype == np.float32
    np.testing.assert_array_equal(ds.x_test, mnist.x_test[..., 0])
    if mnist.x_train is None:  # only the test split is there
        assert ds.x_train is None
    else:  # the whole distribution: the training split read the same way
        assert ds.x_train.shape == (60_000, 28, 28)
        np.testing.assert_array_equal(ds.x_train, mnist.x_train[..., 0])
    assert list(ds.y_test[:10]) == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]


def test_seq_mnist_needs_the_files(tmp_path, monkeypatch):
    monkeypatch.delenv("JAXMODELS_DATA", raising=False)
    with pytest.raises(FileNotFoundError, match="JAXMODELS_DATA"):
        get_dataset("seq-mnist")
    with pytest.raises(FileNotFoundError, match="no MNIST files"):
        get_dataset("seq-mnist", data_dir=tmp_path)


# ----------------------------------------------------------------------------------------- adding


@pytest.mark.parametrize("seq_len", [2, 7, 50])
def test_adding_layout_markers_and_targets(seq_len):
    ds = get_dataset("adding", seq_len=seq_len, train_size=300, test_size=40, seed=3)
    assert (ds.task, ds.num_classes, ds.input_shape) == ("regression", None, (seq_len, 2))
    assert ds.x_train.shape == (300, seq_len, 2) and ds.y_train.shape == (300, 1)
    assert ds.x_test.shape == (40, seq_len, 2) and ds.y_test.shape == (40, 1)
    assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.float32
    for x, y in ((ds.x_train, ds.y_train), (ds.x_test, ds.y_test)):
        values, markers = x[..., 0], x[..., 1]
        assert values.min() >= 0.0 and values.max() < 1.0
        assert set(np.unique(markers)) <= {0.0, 1.0}
        half = seq_len // 2
        assert np.all(markers[:, :half].sum(axis=1) == 1) and np.all(
            markers[:, half:].sum(axis=1) == 1
        )
        rows, steps = np.nonzero(markers)  # row-major: each example's two marked steps, in order
        marked = values[rows, steps].reshape(-1, 2)
        np.testing.assert_array_equal(y[:, 0], marked[:, 0] + marked[:, 1])
    assert ds.info["baseline_mse"] == pytest.approx(1 / 6)


def test_adding_is_deterministic_and_splits_are_independent_streams():
    a = get_dataset("adding", seq_len=20, train_size=64, test_size=16, seed=1)
    b = get_dataset("adding", seq_len=20, train_size=64, test_size=16, seed=1)
    for name in ("x_train", "y_train", "x_test", "y_test"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    c = get_dataset("adding", seq_len=20, train_size=64, test_size=16, seed=2)
    assert not np.array_equal(a.x_train, c.x_train)
    bigger = get_dataset("adding", seq_len=20, train_size=128, test_size=16, seed=1)
    np.testing.assert_array_equal(
        bigger.x_test, a.x_test
    )  # the test set does not depend on train_size
    np.testing.assert_array_equal(bigger.x_train[:64], a.x_train)  # more examples only append
    # the baseline: always answering 1 scores about the variance of the sum, 1/6
    big = get_dataset("adding", seq_len=10, train_size=20_000, test_size=0)
    assert np.mean((big.y_train - 1.0) ** 2) == pytest.approx(1 / 6, rel=0.03)


@pytest.mark.parametrize(
    "bad", [{"seq_len": 1}, {"seq_len": 0}, {"train_size": 0}, {"seq_len": 2.5}]
)
def test_adding_bad_sizes(bad):
    with pytest.raises(ValueError, match="expected an integer"):
        get_dataset("adding", **bad)


# ------------------------------------------------------------------------------------------- copy


@pytest.mark.parametrize("seq_len", [1, 5, 30])
def test_copy_inputs_and_targets(seq_len):
    ds = get_dataset("copy", seq_len=seq_len, train_size=200, test_size=20, seed=4)
    time = seq_len + 20
    assert (ds.task, ds.num_classes, ds.input_shape) == ("language_model", 10, (time,))
    assert ds.x_train.shape == ds.y_train.shape == (200, time) and ds.x_test.shape == (20, time)
    assert ds.x_train.dtype == ds.y_train.dtype == np.int32
    for x, y in ((ds.x_train, ds.y_train), (ds.x_test, ds.y_test)):
        symbols = x[:, :10]
        assert symbols.min() >= 1 and symbols.max() <= 8
        assert np.all(x[:, 10 : 10 + seq_len - 1] == 0)  # T - 1 blanks
        assert np.all(x[:, 10 + seq_len - 1] == 9)  # the delimiter
        assert np.all(x[:, -10:] == 0)  # 10 blanks while the answer is written
        assert np.all(y[:, :-10] == 0)
        np.testing.assert_array_equal(y[:, -10:], symbols)
    assert len(set(map(tuple, ds.x_train[:, :10]))) > 190  # symbols drawn afresh per example
    assert (
        ds.decode(ds.x_train[0]).endswith("_" * 10)
        and ds.decode(ds.x_train[0])[10 + seq_len - 1] == "|"
    )
    assert ds.decode(ds.y_train[0])[-10:] == ds.decode(ds.x_train[0])[:10]


def test_copy_baseline_is_the_memoryless_loss():
    ds = get_dataset("copy", seq_len=12, train_size=64, test_size=8)
    assert ds.info["baseline_loss"] == pytest.approx(10 * math.log(8) / 32)
    # the best memoryless answer: blank (certain) until the last 10 steps, then uniform over the 8 symbols
    logits = np.full((64, 32, 10), -1e9, np.float32)
    logits[:, :-10, 0] = 0.0
    logits[:, -10:, 1:9] = 0.0
    loss = language_model_loss(jnp.asarray(logits), jnp.asarray(ds.y_train))["loss"]
    np.testing.assert_allclose(np.asarray(loss), ds.info["baseline_loss"], rtol=1e-5)


def test_copy_is_deterministic_and_configurable():
    a, b = (get_dataset("copy", seq_len=9, train_size=32, test_size=8, seed=5) for _ in range(2))
    np.testing.assert_array_equal(a.x_train, b.x_train)
    np.testing.assert_array_equal(a.y_test, b.y_test)
    bigger = get_dataset("copy", seq_len=9, train_size=64, test_size=8, seed=5)
    np.testing.assert_array_equal(bigger.x_train[:32], a.x_train)
    np.testing.assert_array_equal(bigger.y_test, a.y_test)
    assert not np.array_equal(
        get_dataset("copy", seq_len=9, train_size=32, test_size=8, seed=6).x_train, a.x_train
    )
    small = get_dataset("copy", seq_len=4, alphabet=3, memory=2, train_size=16, test_size=4)
    assert (
        small.x_train.shape == (16, 8)
        and small.num_classes == 5
        and small.vocab == ("_", "1", "2", "3", "|")
    )
    assert np.all(small.x_train[:, 2 + 4 - 1] == 4) and np.array_equal(
        small.y_train[:, -2:], small.x_train[:, :2]
    )
    assert small.info["baseline_loss"] == pytest.approx(2 * math.log(3) / 8)


# ------------------------------------------------------------------------------------------- text

TEXT = (
    "To be, or not to be: that is the question.\r\nWhether 'tis nobler — in the mind — to suffer.\n"
    * 5
)


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_bytes(TEXT.encode("utf-8"))
    return path


def test_text_vocab_roundtrip_windows_and_split(text_file):
    ds = get_dataset("text", path=text_file, seq_len=16)
    assert (ds.task, ds.input_shape) == ("language_model", (16,))
    assert ds.vocab == tuple(sorted(set(TEXT))) and ds.num_classes == len(set(TEXT))
    assert (
        "\r" in ds.vocab and "—" in ds.vocab
    )  # read as is: no newline translation, any code point
    assert ds.decode(ds.encode(TEXT)) == TEXT
    # contiguous split: the last 10% of the characters is the validation (test) split
    n_val = round(len(TEXT) * 0.1)
    train_text, val_text = TEXT[: len(TEXT) - n_val], TEXT[len(TEXT) - n_val :]
    assert (
        ds.info["train_characters"] == len(train_text) and ds.info["validation_characters"] == n_val
    )
    for x, y, part in ((ds.x_train, ds.y_train, train_text), (ds.x_test, ds.y_test, val_text)):
        assert x.dtype == y.dtype == np.int32 and x.shape == y.shape == (
            (len(part) - 17) // 16 + 1,
            16,
        )
        for i in (0, 1, len(x) - 1):
            assert ds.decode(x[i]) == part[16 * i : 16 * i + 16]
            assert ds.decode(y[i]) == part[16 * i + 1 : 16 * i + 17]  # next character at every step
    assert (
        ds.decode(ds.x_train.reshape(-1)) == train_text[: 16 * len(ds.x_train)]
    )  # adjacent, no gaps


def test_text_stride_no_validation_and_env(text_file, monkeypatch):
    ds = get_dataset("text", path=text_file, seq_len=10, stride=3, val_fraction=0.0)
    assert ds.x_test is None and len(ds.x_train) == (len(TEXT) - 11) // 3 + 1
    assert ds.decode(ds.x_train[2]) == TEXT[6:16]
    monkeypatch.setenv("JAXMODELS_TEXT", str(text_file))
    assert get_dataset("text", seq_len=10).vocab == ds.vocab
    again = get_dataset("text", seq_len=10)
    np.testing.assert_array_equal(again.x_train, get_dataset("text", seq_len=10).x_train)


def test_text_errors(tmp_path, text_file, monkeypatch):
    monkeypatch.delenv("JAXMODELS_TEXT", raising=False)
    with pytest.raises(FileNotFoundError, match="JAXMODELS_TEXT"):
        get_dataset("text")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        get_dataset("text", path=tmp_path / "nope.txt")
    (tmp_path / "latin1.txt").write_bytes("café".encode("latin-1"))
    with pytest.raises(ValueError, match="not UTF-8"):
        get_dataset("text", path=tmp_path / "latin1.txt")
    with pytest.raises(ValueError, match="validation split has"):
        get_dataset("text", path=text_file, seq_len=100)
    ds = get_dataset("text", path=text_file, seq_len=8)
    with pytest.raises(ValueError, match="not in the vocabulary"):
        ds.encode("xyz€")
    with pytest.raises(ValueError, match="token ids"):
        ds.decode(np.array([0, len(ds.vocab)]))


@needs_shakespeare
def test_tiny_shakespeare():
    ds = get_dataset("text", path=SHAKESPEARE, seq_len=100)
    text = SHAKESPEARE.read_text(encoding="utf-8")
    assert ds.info["characters"] == len(text) == 1_115_394 and ds.num_classes == len(ds.vocab) == 65
    assert ds.info["train_characters"] == 1_003_855 and ds.info["validation_characters"] == 111_539
    assert ds.x_train.shape == (10_038, 100) and ds.x_test.shape == (1_115, 100)
    assert ds.decode(ds.x_train[0]) == text[:100]
    val_start = 1_003_855  # the last validation window starts at 1114 * 100 inside the split
    assert ds.decode(ds.y_test[-1]) == text[val_start + 111_401 : val_start + 111_501]


# --------------------------------------------------------------------------------- MNIST download


def _closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/"  # nothing listens there: connection refused, as offline


@needs_mnist
def test_download_from_a_file_mirror_verifies_the_real_checksums(tmp_path):
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    for name in MNIST_TEST_FILES:
        shutil.copy(MNIST_DIR / name, mirror / name)
    folder = download_mnist(
        tmp_path / "data", splits=("test",), mirrors=[_closed_port_url(), mirror.as_uri() + "/"]
    )
    assert folder == tmp_path / "data" / "mnist"
    assert sorted(p.name for p in folder.iterdir()) == sorted(MNIST_TEST_FILES)  # no .part left
    # this copy is re-compressed: it passes on the digest of its content, which we check independently
    raw = gzip.decompress((folder / "t10k-images-idx3-ubyte.gz").read_bytes())
    assert hashlib.sha256(raw).hexdigest() == MNIST_SHA256["t10k-images-idx3-ubyte"][1]
    ds = load_mnist(tmp_path / "data")
    np.testing.assert_array_equal(ds.x_test, load_mnist(SHARED_DATA).x_test)
    # present and valid: checked, not fetched (no mirrors needed)
    assert download_mnist(tmp_path / "data", splits=("test",), mirrors=[]) == folder


def test_download_checksum_mismatch_writes_nothing(tmp_path):
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    idx = (
        b"\x00\x00\x08\x01" + b"\x00\x00\x00\x02" + b"\x07\x02"
    )  # a valid IDX file, but not MNIST's
    (mirror / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(idx))
    target = tmp_path / "data"
    with pytest.raises(
        ValueError, match=r"t10k-images-idx3-ubyte failed verification.*checksum mismatch"
    ):
        download_mnist(target, splits=("test",), mirrors=[mirror.as_uri()])
    assert list((target / "mnist").iterdir()) == []


def test_download_accepts_the_published_gzip_digest(tmp_path, monkeypatch):
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    payloads = {}
    for name in ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        payloads[name] = gzip.compress(
            b"\x00\x00\x08\x01\x00\x00\x00\x01" + name[:1].encode(), mtime=0
        )
        (mirror / (name + ".gz")).write_bytes(payloads[name])
        monkeypatch.setitem(
            MNIST_SHA256, name, (hashlib.sha256(payloads[name]).hexdigest(), "0" * 64)
        )
    folder = download_mnist(tmp_path / "mnist", splits=("test",), mirrors=[mirror.as_uri()])
    assert folder == tmp_path / "mnist"  # a folder named mnist is used as is
    for name, payload in payloads.items():
        assert (folder / (name + ".gz")).read_bytes() == payload


def test_download_offline_is_a_clear_error(tmp_path, monkeypatch):
    offline = (
        r"could not download MNIST file train-images-idx3-ubyte\.gz \(is this machine offline\?\)"
    )
    with pytest.raises(FileNotFoundError, match=offline):
        download_mnist(tmp_path, mirrors=[_closed_port_url()], timeout=5)
    monkeypatch.delenv("JAXMODELS_DATA", raising=False)
    with pytest.raises(FileNotFoundError, match="no data folder to download MNIST into"):
        download_mnist()
    with pytest.raises(ValueError, match="expected splits"):
        download_mnist(tmp_path, splits=("validation",))
    monkeypatch.setattr(
        mnist, "MNIST_MIRRORS", ()
    )  # load_mnist(download=True) goes through download_mnist
    with pytest.raises(FileNotFoundError, match="could not download"):
        load_mnist(tmp_path, download=True)


def test_download_never_overwrites_a_bad_existing_file(tmp_path):
    folder = tmp_path / "mnist"
    folder.mkdir()
    (folder / "t10k-images-idx3-ubyte").write_bytes(b"not mnist")
    with pytest.raises(ValueError, match=r"is not MNIST's t10k-images-idx3-ubyte.*remove it"):
        download_mnist(tmp_path, splits=("test",), mirrors=[_closed_port_url()])
    assert (folder / "t10k-images-idx3-ubyte").read_bytes() == b"not mnist"


# --------------------------------------------------------------------------------------- training


def _train(model, ds, tmp_path, **config):
    cfg = TrainConfig(progress=False, plot=False, log_every=1, schedule="constant", **config)
    result = fit(model, ds, cfg, tmp_path)
    losses = [row["loss"] for row in result.history if row["kind"] == "train"]
    assert all(np.isfinite(losses)) and "loss" in result.test_metrics
    return losses


def _small(ds, train: int, test: int):
    return dataclasses.replace(
        ds,
        x_train=ds.x_train[:train],
        y_train=ds.y_train[:train],
        x_test=ds.x_test[:test],
        y_test=ds.y_test[:test],
    )


def test_seq_digits_trains_an_lstm_classifier(seq_digits, tmp_path):
    model = get_model("lstm-classifier", hidden_size=32, num_classes=seq_digits.num_classes)
    losses = _train(model, _small(seq_digits, 640, 64), tmp_path, epochs=1, batch_size=32, lr=1e-2)
    assert np.mean(losses[-4:]) < np.mean(losses[:4]) - 0.3, losses


def test_adding_trains_an_lstm_regressor(tmp_path):
    ds = get_dataset("adding", seq_len=10, train_size=1024, test_size=64)
    losses = _train(
        get_model("lstm-regressor", hidden_size=16), ds, tmp_path, epochs=1, batch_size=32, lr=1e-2
    )
    assert np.mean(losses[-4:]) < 0.5 * np.mean(losses[:4]), losses


def test_copy_trains_a_char_lstm(tmp_path):
    ds = get_dataset("copy", seq_len=5, train_size=640, test_size=32)
    model = get_model(
        "char-lstm", vocab_size=ds.num_classes, embed_size=8, hidden_size=32, num_layers=1
    )
    losses = _train(model, ds, tmp_path, epochs=1, batch_size=32, lr=1e-2)
    assert losses[0] == pytest.approx(
        math.log(10), abs=0.1
    )  # uniform over the vocabulary at the start
    assert np.mean(losses[-4:]) < 1.5, (
        losses
    )  # learnt the blanks: heading for the baseline, 0.83 here


def test_text_trains_a_char_lstm(tmp_path):
    path = tmp_path / "abc.txt"
    path.write_text("the quick brown fox jumps over the lazy dog. " * 200, encoding="utf-8")
    ds = get_dataset("text", path=path, seq_len=32)
    model = get_model(
        "char-lstm", vocab_size=ds.num_classes, embed_size=8, hidden_size=32, num_layers=1
    )
    losses = _train(model, ds, tmp_path / "run", epochs=3, batch_size=16, lr=1e-2)
    assert losses[0] == pytest.approx(math.log(ds.num_classes), abs=0.1)
    assert np.mean(losses[-3:]) < np.mean(losses[:3]) - 0.5, losses


def test_cli_trains_on_the_new_data_sets(tmp_path, capsys):
    from jaxmodels.cli import main

    common = ["--epochs", "1", "--max-steps", "3", "--batch-size", "16", "--no-progress"]
    assert (
        main(
            [
                "train",
                "lstm-classifier",
                "--dataset",
                "seq-digits",
                "--workdir",
                str(tmp_path / "a"),
                *common,
            ]
        )
        == 0
    )
    adding = ["--dataset", "adding", "--seq-len", "6"]
    assert main(["train", "rnn-regressor", *adding, "--workdir", str(tmp_path / "b"), *common]) == 0
    assert "rnn-regressor on adding: test loss" in capsys.readouterr().out
    assert main(["train", "cnn", "--seq-len", "6", "--workdir", str(tmp_path / "c"), *common]) == 1
    assert "--seq-len does not apply to --dataset digits" in capsys.readouterr().err
