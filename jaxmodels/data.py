"""Data sets and batch iterators.

    >>> ds = get_dataset("digits")                     # ds.x_train [1437, 28, 28, 1] float32 in [0, 1]
    >>> it = BatchIterator((ds.x_train, ds.y_train), batch_size=64, seed=0)
    >>> for batch in it.epoch():                       # {"x": [64, 28, 28, 1], "y": [64], "mask": [64]}
    ...     ...
    >>> saved = it.position                            # Position(epoch, step); it.restore(saved) resumes

Arrays are host numpy arrays; placing them on devices is the trainer's (or a strategy's) job.

Data sets (``list_datasets()``): images for ``cnn``: "digits" (bundled), "mnist" (IDX files;
``download_mnist`` fetches them); sequences for the *-classifier models: "seq-mnist", "seq-digits"
(image rows as time steps); for the *-regressor models: "adding"; for ``char-lstm``: "copy" and
"text" (character-level language modelling over a UTF-8 file).
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import hashlib
import math
import os
import urllib.request
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

DATA_ENV = "JAXMODELS_DATA"
REMAINDERS = ("drop", "pad", "keep")


@dataclasses.dataclass(frozen=True)
class Dataset:
    """A data set held in host memory.

    Attributes:
      name: registry name.
      task: "classification", "regression" or "language_model" (matches ``Model.task``).
      x_train, y_train: inputs [examples, *input_shape] and targets [examples, ...]; None when the
        split is absent (e.g. a folder with only MNIST's test files).
      x_test, y_test: the same for the test split.
      input_shape: shape of one input, e.g. (28, 28, 1) [height, width, channels].
      num_classes: number of classes (classification) or vocabulary size (language model), else None.
      vocab: for token data, the string of each token id (``vocab[i]`` is token i), else None;
        ``encode`` / ``decode`` use it.
      info: facts about how the data was made or what scores mean (e.g. seq_len, seed,
        "baseline_loss" of a synthetic task); JSON-friendly values.
    """

    name: str
    task: str
    x_train: np.ndarray | None
    y_train: np.ndarray | None
    x_test: np.ndarray | None
    y_test: np.ndarray | None
    input_shape: tuple[int, ...]
    num_classes: int | None = None
    vocab: tuple[str, ...] | None = None
    info: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def encode(self, text: str) -> np.ndarray:
        """Token ids [len(text)] int32 of ``text``, one per character (``vocab``'s entries must be
        single characters, as for ``text``)."""
        if self.vocab is None:
            raise ValueError(f"dataset {self.name!r} has no vocabulary")
        index = {token: i for i, token in enumerate(self.vocab)}
        missing = sorted(set(text) - index.keys())
        if missing:
            raise ValueError(f"characters not in the vocabulary of {self.name!r}: {missing[:10]!r}")
        return np.array([index[c] for c in text], np.int32)

    def decode(self, tokens: Sequence[int] | np.ndarray) -> str:
        """The string of token ids ``tokens`` [time]: their ``vocab`` entries joined."""
        if self.vocab is None:
            raise ValueError(f"dataset {self.name!r} has no vocabulary")
        ids = np.asarray(tokens)
        if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(
                f"expected integer tokens of rank 1 [time], got shape {ids.shape} dtype {ids.dtype}"
            )
        if ids.size and (ids.min() < 0 or ids.max() >= len(self.vocab)):
            raise ValueError(
                f"expected token ids in [0, {len(self.vocab)}), got {ids.min()}..{ids.max()}"
            )
        return "".join(self.vocab[i] for i in ids.tolist())

    def __repr__(self) -> str:
        def size(x):
            return "absent" if x is None else str(len(x))

        return (
            f"Dataset({self.name!r}, task={self.task!r}, train={size(self.x_train)}, "
            f"test={size(self.x_test)}, input_shape={self.input_shape}, num_classes={self.num_classes})"
        )


# --------------------------------------------------------------------------------------- digits


def upsample_digits(images: np.ndarray, size: int = 20, canvas: int = 28) -> np.ndarray:
    """MNIST layout for small digit images: images [examples, h, w] in [0, 1] -> [examples, canvas,
    canvas, 1] float32.

    Each image is resized to ``size`` x ``size`` with bilinear interpolation (``jax.image.resize``,
    "linear": half-pixel centres, edges clamped; a convex combination of neighbouring pixels, so
    values stay in [0, 1]) and centred on a ``canvas`` x ``canvas`` zero background, as MNIST puts
    its size-normalised 20x20 digits in a 28x28 field.
    """
    import jax
    import jax.numpy as jnp

    if not 0 < size <= canvas or (canvas - size) % 2:
        raise ValueError(
            f"expected 0 < size <= canvas with an even margin, got size={size} canvas={canvas}"
        )
    if images.ndim != 3:
        raise ValueError(
            f"expected images of rank 3 [examples, height, width], got shape {images.shape}"
        )
    with jax.default_device(jax.local_devices(backend="cpu")[0]):
        resized = jax.image.resize(
            jnp.asarray(images, jnp.float32), (len(images), size, size), method="linear"
        )
        resized = np.clip(np.asarray(resized), 0.0, 1.0)
    margin = (canvas - size) // 2
    out = np.zeros((len(images), canvas, canvas, 1), np.float32)
    out[:, margin : margin + size, margin : margin + size, 0] = resized
    return out


def load_digits(
    *, test_size: int = 360, seed: int = 0, size: int = 20, canvas: int = 28
) -> Dataset:
    """scikit-learn's bundled 8x8 handwritten digits (1,797 images, no network), shaped like MNIST.

    Each 8x8 image (counts 0..16 of set pixels in 4x4 blocks of a 32x32 bitmap) is divided by 16
    and put in MNIST's layout by ``upsample_digits``: bilinear resize to 20x20, centred in 28x28.
    The split is stratified by class and fixed by ``seed``: 1,437 train / 360 test by default.

    Returns x [examples, 28, 28, 1] float32 in [0, 1] and y [examples] int32 for each split.
    """
    from sklearn.datasets import load_digits as sk_load_digits
    from sklearn.model_selection import train_test_split

    bunch = sk_load_digits()
    x = upsample_digits(np.asarray(bunch.images, np.float32) / np.float32(16.0), size, canvas)
    y = np.asarray(bunch.target, np.int32)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=test_size, random_state=seed, stratify=y
    )
    return Dataset(
        "digits", "classification", x_train, y_train, x_test, y_test, (canvas, canvas, 1), 10
    )


# ---------------------------------------------------------------------------------------- MNIST

MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}

_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (gzipped when the name ends in .gz): magic 0x0000 <dtype> <rank>, then
    ``rank`` big-endian int32 dimensions, then the data in row-major order."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise ValueError(
            f"{path} is not an IDX file: expected magic 00 00 <dtype> <rank>, got {raw[:4].hex(' ')}"
        )
    rank = raw[3]
    header = 4 + 4 * rank
    shape = tuple(int(d) for d in np.frombuffer(raw, ">i4", count=rank, offset=4))
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    expected = header + int(np.prod(shape)) * dtype.itemsize
    if len(raw) != expected:
        raise ValueError(
            f"{path}: header says shape {shape} ({expected} bytes), file has {len(raw)} bytes"
        )
    return np.frombuffer(raw, dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def _find(folder: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz"):
        if (folder / name).is_file():
            return folder / name
    return None


def resolve_data_dir(data_dir: str | os.PathLike | None, subdir: str) -> Path:
    """The folder given, else ``$JAXMODELS_DATA``; a ``subdir`` inside it (e.g. "mnist") is used when
    present, so both JAXMODELS_DATA=/data and JAXMODELS_DATA=/data/mnist work."""
    if data_dir is None:
        data_dir = os.environ.get(DATA_ENV)
        if not data_dir:
            raise FileNotFoundError(
                f"no data folder given: pass data_dir (--data-dir) or set {DATA_ENV}"
            )
    folder = Path(data_dir).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"data folder {folder} does not exist")
    return folder / subdir if (folder / subdir).is_dir() else folder


def load_mnist(data_dir: str | os.PathLike | None = None, *, download: bool = False) -> Dataset:
    """MNIST from the standard IDX files (gzipped or not) in ``data_dir`` or ``$JAXMODELS_DATA``.

    Reads whichever of the train (60,000) and test (10,000) splits are present; at least one must
    be. Returns x [examples, 28, 28, 1] float32 in [0, 1] (pixel / 255) and y [examples] int32.
    With ``download``, first fetches (and verifies) whichever of the four files are missing, see
    ``download_mnist``.
    """
    if download:
        download_mnist(data_dir)
    folder = resolve_data_dir(data_dir, "mnist")
    splits: dict[str, tuple[np.ndarray, np.ndarray] | None] = {}
    for split, (images_name, labels_name) in MNIST_FILES.items():
        images_path, labels_path = _find(folder, images_name), _find(folder, labels_name)
        if images_path is None and labels_path is None:
            splits[split] = None
            continue
        if images_path is None or labels_path is None:
            missing = images_name if images_path is None else labels_name
            raise FileNotFoundError(
                f"MNIST {split} split in {folder} is incomplete: missing {missing}[.gz]"
            )
        images, labels = read_idx(images_path), read_idx(labels_path)
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise ValueError(
                f"MNIST {split} split in {folder}: expected images [examples, 28, 28] and labels [examples], "
                f"got {images.shape} and {labels.shape}"
            )
        x = (images.astype(np.float32) / np.float32(255.0))[..., None]
        splits[split] = (x, labels.astype(np.int32))
    if all(s is None for s in splits.values()):
        expected = ", ".join(f"{name}[.gz]" for pair in MNIST_FILES.values() for name in pair)
        raise FileNotFoundError(f"no MNIST files in {folder}; expected {expected}")
    train, test = splits["train"] or (None, None), splits["test"] or (None, None)
    shape = next(s for s in splits.values() if s is not None)[0].shape[1:]
    return Dataset("mnist", "classification", *train, *test, tuple(shape), 10)


# Mirrors of the four files as LeCun, Cortes and Burges published them (yann.lecun.com itself often
# refuses downloads now): PyTorch's (torchvision's default) and Google's (TensorFlow Datasets').
MNIST_MIRRORS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
)

# SHA-256 of each file as the mirrors serve it (gzip) and of its decompressed IDX content. The gzip
# digests are the ones public projects pin for the original files (at yann.lecun.com and the Google
# mirror); the content digests identify the data however a copy was re-compressed. The test-split
# content digests were checked here against a local copy of the test files; the training-split ones
# against several independent public listings only (no training files were at hand).
MNIST_SHA256 = {
    "train-images-idx3-ubyte": (
        "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
        "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    ),
    "train-labels-idx1-ubyte": (
        "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
        "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    ),
    "t10k-images-idx3-ubyte": (
        "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
        "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    ),
    "t10k-labels-idx1-ubyte": (
        "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
        "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
    ),
}


def _mnist_digest_matches(name: str, data: bytes) -> tuple[bool, str]:
    """Whether ``data`` (a file's bytes, gzipped or not) is MNIST's ``name``: its SHA-256 is the
    published gzip digest, or its decompressed content's is the content digest. Also returns the
    digest of ``data`` itself, for messages."""
    gz_digest, raw_digest = MNIST_SHA256[name]
    digest = hashlib.sha256(data).hexdigest()
    if digest == gz_digest:
        return True, digest
    try:
        raw = gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data
    except (OSError, EOFError, zlib.error):
        return False, digest
    return hashlib.sha256(raw).hexdigest() == raw_digest, digest


def _mnist_target_folder(root: Path) -> Path:
    """Where files for ``root`` go so that ``load_mnist(root)`` reads them: its "mnist" subfolder
    unless ``root`` is itself named "mnist" or already holds MNIST files."""
    if (root / "mnist").is_dir():
        return root / "mnist"
    if root.name == "mnist" or any(_find(root, n) for pair in MNIST_FILES.values() for n in pair):
        return root
    return root / "mnist"


def _fetch(url: str, timeout: float) -> bytes:
    """The bytes at ``url`` (http(s) or file://)."""
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.read()


def download_mnist(
    data_dir: str | os.PathLike | None = None,
    *,
    splits: Sequence[str] = ("train", "test"),
    mirrors: Sequence[str] = MNIST_MIRRORS,
    timeout: float = 60.0,
) -> Path:
    """Download MNIST's IDX files for ``splits`` into ``data_dir`` (else ``$JAXMODELS_DATA``) and
    verify their SHA-256 (``MNIST_SHA256``); returns the folder written, which ``load_mnist(data_dir)``
    reads: ``data_dir/mnist`` (created when needed) unless ``data_dir`` is named "mnist" or already
    holds MNIST files.

    Files already there are checked, not fetched again; one that fails the check is an error (it is
    never overwritten). Each missing file is tried on each mirror in turn (``mirror + name + ".gz"``,
    http(s) or file://), written under a temporary name and renamed once verified.

    Raises FileNotFoundError when no mirror could be reached (e.g. offline), ValueError when a
    mirror served a file whose checksum does not match.
    """
    if data_dir is None:
        data_dir = os.environ.get(DATA_ENV)
        if not data_dir:
            raise FileNotFoundError(
                f"no data folder to download MNIST into: pass data_dir or set {DATA_ENV}"
            )
    unknown = [s for s in splits if s not in MNIST_FILES]
    if unknown or not splits:
        raise ValueError(f"expected splits among {tuple(MNIST_FILES)}, got {tuple(splits)}")
    folder = _mnist_target_folder(Path(data_dir).expanduser())
    folder.mkdir(parents=True, exist_ok=True)
    for split in splits:
        for name in MNIST_FILES[split]:
            existing = _find(folder, name)
            if existing is not None:
                ok, digest = _mnist_digest_matches(name, existing.read_bytes())
                if not ok:
                    raise ValueError(
                        f"{existing} is not MNIST's {name}: its SHA-256 is {digest}; expected "
                        f"{MNIST_SHA256[name][0]} (gzip) or that content; remove it and download again"
                    )
                continue
            data, failures, mismatch = None, [], False
            for mirror in mirrors:
                url = mirror.rstrip("/") + "/" + name + ".gz"
                try:
                    fetched = _fetch(url, timeout)
                except (
                    OSError,
                    ValueError,
                ) as err:  # URLError, timeouts, refused connections are OSErrors
                    failures.append(f"{url}: {getattr(err, 'reason', err)}")
                    continue
                ok, digest = _mnist_digest_matches(name, fetched)
                if ok:
                    data = fetched
                    break
                mismatch = True
                failures.append(f"{url}: checksum mismatch, SHA-256 {digest}")
            tried = "; ".join(failures) or "no mirrors given"
            if data is None and mismatch:
                raise ValueError(
                    f"MNIST file {name} failed verification (expected SHA-256 {MNIST_SHA256[name][0]} for "
                    f"the gzip file, or {MNIST_SHA256[name][1]} for its content); nothing was written. Tried: {tried}"
                )
            if data is None:
                raise FileNotFoundError(
                    f"could not download MNIST file {name}.gz (is this machine offline?). Tried: {tried}. "
                    f"Without a network, copy the four MNIST IDX files (.gz or not) into {folder} by hand"
                )
            target = folder / (name + (".gz" if data[:2] == b"\x1f\x8b" else ""))
            partial = target.with_name(target.name + ".part")
            partial.write_bytes(data)
            os.replace(partial, target)
    return folder


# --------------------------------------------------------------- sequential images (rows as time)

SEQUENCE_STEPS = ("rows", "pixels")


def _as_sequences(ds: Dataset, name: str, steps: str, permute: int | None) -> Dataset:
    """Images [examples, height, width, 1] -> sequences for the *-classifier models: "rows" gives
    [examples, height, width] (time = image row, features = its pixels), "pixels" gives
    [examples, height * width, 1] (one pixel per step, raster order). ``permute``: the seed of one
    fixed permutation of the time steps, the same for every example and split (permuted MNIST)."""
    if steps not in SEQUENCE_STEPS:
        raise ValueError(f"expected steps to be one of {SEQUENCE_STEPS}, got {steps!r}")
    height, width, channels = ds.input_shape
    if channels != 1:
        raise ValueError(
            f"expected images [examples, height, width, 1], got input shape {ds.input_shape}"
        )
    shape = (height, width) if steps == "rows" else (height * width, 1)
    order = None if permute is None else np.random.default_rng(permute).permutation(shape[0])

    def convert(x: np.ndarray | None) -> np.ndarray | None:
        if x is None:
            return None
        seq = x.reshape(len(x), *shape)
        return seq if order is None else seq[:, order]

    info = {"source": ds.name, "steps": steps, "permute": permute}
    return dataclasses.replace(
        ds,
        name=name,
        x_train=convert(ds.x_train),
        x_test=convert(ds.x_test),
        input_shape=shape,
        info=info,
    )


def load_seq_mnist(
    data_dir: str | os.PathLike | None = None,
    *,
    steps: str = "rows",
    permute: int | None = None,
    download: bool = False,
) -> Dataset:
    """Sequential MNIST: ``load_mnist`` with each image read as a sequence.

    x [examples, 28, 28] float32 (time = image row, features = the row's 28 pixels in [0, 1]) for
    the lstm-/rnn-classifier models, y [examples] int32. ``steps="pixels"``: [examples, 784, 1], the
    pixel-by-pixel task of Le et al. (2015); ``permute=seed`` adds their fixed random permutation.
    Needs the MNIST files (no fallback to digits, so a result always names its data); ``seq-digits``
    is the offline stand-in.
    """
    return _as_sequences(load_mnist(data_dir, download=download), "seq-mnist", steps, permute)


def load_seq_digits(
    *, steps: str = "rows", permute: int | None = None, **digits_options
) -> Dataset:
    """Sequential digits: ``load_digits`` (bundled, no network) read as sequences exactly like
    ``load_seq_mnist``: x [examples, 28, 28] float32 (rows as time steps), y [examples] int32.
    ``digits_options`` go to ``load_digits`` (test_size, seed, size, canvas)."""
    return _as_sequences(load_digits(**digits_options), "seq-digits", steps, permute)


# ------------------------------------------------------------ synthetic long-range tasks (seeded)
# Each split comes from its own stream, np.random.default_rng([seed, split]) with split 0 = train and
# 1 = test, so a split is a function of (seed, seq_len, its size) alone: changing train_size leaves
# the test set as it was, and a larger size only appends examples to a smaller one.


def _check_sizes(seq_len: int, train_size: int, test_size: int, min_len: int) -> None:
    checks = (
        ("seq_len", seq_len, min_len),
        ("train_size", train_size, 1),
        ("test_size", test_size, 0),
    )
    for label, value, least in checks:
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < least:
            raise ValueError(f"expected an integer {label} >= {least}, got {value!r}")


def adding_problem(
    num: int, seq_len: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """``num`` examples of the adding problem (Hochreiter & Schmidhuber 1997, in the form of Le et al.
    2015 and Arjovsky et al. 2016).

    x [num, seq_len, 2] float32: feature 0 values uniform in [0, 1); feature 1 a marker, 1 at exactly
    two steps, one uniformly in the first half ``[0, seq_len // 2)`` and one in the second half
    ``[seq_len // 2, seq_len)``, else 0. y [num, 1] float32: the sum of the two marked values,
    ``sum_t x[:, t, 0] * x[:, t, 1]``. Predicting the mean, 1, scores MSE 1/6 (the variance of the sum).
    """
    values_rng, first_rng, second_rng = rng.spawn(
        3
    )  # one stream each: more examples extend, not reshuffle
    values = values_rng.random((num, seq_len), dtype=np.float32)
    half = seq_len // 2
    first, second = first_rng.integers(0, half, num), second_rng.integers(half, seq_len, num)
    rows = np.arange(num)
    markers = np.zeros((num, seq_len), np.float32)
    markers[rows, first] = 1.0
    markers[rows, second] = 1.0
    targets = (values[rows, first] + values[rows, second])[:, None]
    return np.stack([values, markers], axis=-1), targets


def load_adding(
    *, seq_len: int = 100, train_size: int = 10_000, test_size: int = 1_000, seed: int = 0
) -> Dataset:
    """The adding problem for the lstm-/rnn-regressor models (task "regression"), generated from
    ``seed``: x [examples, seq_len, 2] float32, y [examples, 1] float32 (see ``adding_problem``).
    ``info["baseline_mse"]`` is 1/6, the MSE of always answering 1; a model beats it only by
    remembering the two marked values across up to ``seq_len`` steps."""
    _check_sizes(seq_len, train_size, test_size, 2)
    x_train, y_train = adding_problem(train_size, seq_len, np.random.default_rng([seed, 0]))
    x_test, y_test = adding_problem(test_size, seq_len, np.random.default_rng([seed, 1]))
    info = {"seq_len": seq_len, "seed": seed, "baseline_mse": 1.0 / 6.0}
    return Dataset(
        "adding", "regression", x_train, y_train, x_test, y_test, (seq_len, 2), None, info=info
    )


COPY_BLANK = 0  # token ids of the copy task: 0 blank, 1..alphabet symbols, alphabet + 1 delimiter


def copy_problem(
    num: int, seq_len: int, rng: np.random.Generator, *, alphabet: int = 8, memory: int = 10
) -> tuple[np.ndarray, np.ndarray]:
    """``num`` examples of the copy problem (Arjovsky, Shah & Bengio 2016, after Hochreiter &
    Schmidhuber 1997) with delay ``seq_len`` (their T); time = seq_len + 2 * memory steps.

    Tokens: 0 blank, 1..alphabet the symbols, alphabet + 1 the delimiter. Input x [num, time] int32:
    ``memory`` symbols drawn uniformly with replacement, then seq_len - 1 blanks, the delimiter, and
    ``memory`` blanks. Target y [num, time] int32: blanks, except the last ``memory`` steps, which
    repeat the symbols. The delimiter is the cue to start writing, at step ``memory + seq_len``.
    """
    symbols = rng.integers(1, alphabet + 1, (num, memory), dtype=np.int32)
    time = seq_len + 2 * memory
    x = np.full((num, time), COPY_BLANK, np.int32)
    x[:, :memory] = symbols
    x[:, memory + seq_len - 1] = alphabet + 1
    y = np.full((num, time), COPY_BLANK, np.int32)
    y[:, -memory:] = symbols
    return x, y


def load_copy(
    *,
    seq_len: int = 100,
    train_size: int = 10_000,
    test_size: int = 1_000,
    seed: int = 0,
    alphabet: int = 8,
    memory: int = 10,
) -> Dataset:
    """The copy problem for ``char-lstm`` (task "language_model": tokens [batch, time] in, logits
    [batch, time, vocab] out, per-step cross-entropy), generated from ``seed``.

    x, y [examples, seq_len + 2 * memory] int32 (see ``copy_problem``); vocabulary alphabet + 2
    (``num_classes``; ``vocab`` decodes blank "_", symbols "1".."8", delimiter "|"). The loss is the
    cross-entropy averaged over all steps, so the memoryless baseline (blanks everywhere, then a
    uniform guess among the symbols) scores ``memory * log(alphabet) / (seq_len + 2 * memory)``
    nats, ``info["baseline_loss"]`` (10 log 8 / (T + 20) in the paper's setting). Accuracy is per
    step and mostly blanks: compare the loss with the baseline, not the accuracy with 1.
    """
    _check_sizes(seq_len, train_size, test_size, 1)
    if alphabet < 1 or memory < 1:
        raise ValueError(f"expected alphabet >= 1 and memory >= 1, got {alphabet} and {memory}")
    make = functools.partial(copy_problem, seq_len=seq_len, alphabet=alphabet, memory=memory)
    x_train, y_train = make(train_size, rng=np.random.default_rng([seed, 0]))
    x_test, y_test = make(test_size, rng=np.random.default_rng([seed, 1]))
    vocab = ("_", *(str(i) for i in range(1, alphabet + 1)), "|")
    info = {
        "seq_len": seq_len,
        "seed": seed,
        "alphabet": alphabet,
        "memory": memory,
        "blank": COPY_BLANK,
        "delimiter": alphabet + 1,
        "baseline_loss": memory * math.log(alphabet) / (seq_len + 2 * memory),
    }
    time = seq_len + 2 * memory
    return Dataset(
        "copy",
        "language_model",
        x_train,
        y_train,
        x_test,
        y_test,
        (time,),
        alphabet + 2,
        vocab,
        info,
    )


# ---------------------------------------------------------------------- character-level text

TEXT_ENV = "JAXMODELS_TEXT"


def load_text(
    path: str | os.PathLike | None = None,
    *,
    seq_len: int = 100,
    stride: int | None = None,
    val_fraction: float = 0.1,
) -> Dataset:
    """Character-level language modelling over a UTF-8 file (``path``, else ``$JAXMODELS_TEXT``),
    for ``char-lstm``.

    The file is read as is (no newline translation). Vocabulary: its distinct characters, sorted by
    code point (``vocab``; ``num_classes`` is its size); ``Dataset.encode`` / ``decode`` map text to
    token ids and back. Split: the last ``val_fraction`` of the characters, contiguous, is the
    validation split (the Dataset's test split); the rest is train. Each split is cut into windows of
    ``seq_len + 1`` characters starting every ``stride`` characters (default ``seq_len``: adjacent,
    non-overlapping targets); a window gives x = its first seq_len tokens and y = its last seq_len
    (the next character at every step). x, y [windows, seq_len] int32, read-only views of one token
    array (overlapping windows cost no memory). No window crosses the split.
    """
    if path is None:
        path = os.environ.get(TEXT_ENV)
        if not path:
            raise FileNotFoundError(
                f"no text file given: pass path (--data-file) or set {TEXT_ENV}"
            )
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"text file {path} does not exist")
    stride = seq_len if stride is None else stride
    for label, value in (("seq_len", seq_len), ("stride", stride)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"expected a positive integer {label}, got {value!r}")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"expected 0 <= val_fraction < 1, got {val_fraction}")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{path} is not UTF-8 text: {err}") from None
    codes = np.frombuffer(text.encode("utf-32-le"), "<u4")
    alphabet, tokens = np.unique(codes, return_inverse=True)
    tokens = tokens.astype(np.int32).reshape(-1)
    num_val = round(len(tokens) * val_fraction)
    train_tokens, val_tokens = tokens[: len(tokens) - num_val], tokens[len(tokens) - num_val :]

    def windows(part: np.ndarray, label: str) -> tuple[np.ndarray, np.ndarray]:
        if len(part) < seq_len + 1:
            raise ValueError(
                f"{path}: the {label} split has {len(part)} characters, fewer than one window of "
                f"seq_len + 1 = {seq_len + 1}; use a shorter seq_len or a longer file"
            )
        w = np.lib.stride_tricks.sliding_window_view(part, seq_len + 1)[::stride]
        return w[:, :-1], w[:, 1:]

    x_train, y_train = windows(train_tokens, "train")
    x_test, y_test = windows(val_tokens, "validation") if num_val else (None, None)
    vocab = tuple(chr(c) for c in alphabet)
    info = {
        "path": str(path),
        "seq_len": seq_len,
        "stride": stride,
        "characters": len(tokens),
        "train_characters": len(train_tokens),
        "validation_characters": num_val,
    }
    return Dataset(
        "text",
        "language_model",
        x_train,
        y_train,
        x_test,
        y_test,
        (seq_len,),
        len(vocab),
        vocab,
        info,
    )


# ------------------------------------------------------------------------------------- registry

_REGISTRY: dict[str, Callable[..., Dataset]] = {
    "digits": load_digits,
    "mnist": load_mnist,
    "seq-mnist": load_seq_mnist,
    "seq-digits": load_seq_digits,
    "adding": load_adding,
    "copy": load_copy,
    "text": load_text,
}


def list_datasets() -> tuple[str, ...]:
    """Names accepted by ``get_dataset``."""
    return tuple(_REGISTRY)


def get_dataset(name: str, **opts) -> Dataset:
    """The registered data set ``name``; ``opts`` go to its loader (e.g. ``data_dir`` for mnist)."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown dataset {name!r}; expected one of {list_datasets()}")
    try:
        return _REGISTRY[name](**opts)
    except TypeError as err:
        raise TypeError(f"bad options for dataset {name!r}: {err}") from None


# ------------------------------------------------------------------------------------- batching


class Position(NamedTuple):
    """Where an iterator stands: the next batch is number ``step`` of epoch ``epoch``."""

    epoch: int
    step: int


class BatchIterator:
    """Batches of ``(x, y)`` with a seeded shuffle per epoch and a resumable position.

    The order of epoch ``e`` is ``np.random.default_rng([seed, e]).permutation(examples)``, a
    function of (seed, epoch) only, so ``restore(Position(epoch, step))`` continues exactly where a
    saved iterator stood. Every batch is a dict ``{"x": [batch, ...], "y": [batch, ...],
    "mask": [batch] float32}``; ``mask`` is 1 for real examples and 0 for padding.

    Remainder policy for the last ``examples % batch_size`` examples of an epoch:
      "drop": left out (a different subset each epoch when shuffling); every batch is full.
      "pad":  one last full-size batch, the missing rows filled with copies of real examples and
              masked out; every example counts exactly once and shapes never change (no retrace).
      "keep": one last smaller batch (a second shape, hence a second compilation under jit).
    """

    def __init__(
        self,
        arrays: Sequence[np.ndarray],
        batch_size: int,
        *,
        shuffle: bool = True,
        seed: int = 0,
        remainder: str = "drop",
    ):
        x, y = arrays
        if len(x) != len(y):
            raise ValueError(
                f"expected x and y with the same number of examples, got {len(x)} and {len(y)}"
            )
        if remainder not in REMAINDERS:
            raise ValueError(
                f"unknown remainder policy {remainder!r}; expected one of {REMAINDERS}"
            )
        if (
            isinstance(batch_size, bool)
            or not isinstance(batch_size, (int, np.integer))
            or batch_size <= 0
        ):
            raise ValueError(f"expected a positive integer batch size, got {batch_size!r}")
        if len(x) == 0:
            raise ValueError("expected at least one example, got an empty split")
        if remainder == "drop" and batch_size > len(x):
            raise ValueError(
                f"batch size {batch_size} is larger than the {len(x)} examples: with remainder='drop' "
                f"there would be no batch; use a batch size <= {len(x)} or remainder='pad'/'keep'"
            )
        self.x, self.y = x, y
        self.batch_size = int(batch_size)
        self.shuffle, self.seed, self.remainder = shuffle, seed, remainder
        self._position = Position(0, 0)

    @property
    def num_examples(self) -> int:
        return len(self.x)

    @property
    def steps_per_epoch(self) -> int:
        full, rest = divmod(self.num_examples, self.batch_size)
        return full + (1 if rest and self.remainder != "drop" else 0)

    @property
    def position(self) -> Position:
        return self._position

    def restore(self, position: Position | Sequence[int] | dict) -> None:
        """Continue from a saved ``position`` (a Position, an (epoch, step) pair or a dict)."""
        epoch, step = (
            (position["epoch"], position["step"]) if isinstance(position, dict) else position
        )
        if epoch < 0 or not 0 <= step <= self.steps_per_epoch:
            raise ValueError(
                f"expected epoch >= 0 and 0 <= step <= {self.steps_per_epoch}, got ({epoch}, {step})"
            )
        self._position = Position(int(epoch), int(step))
        if step == self.steps_per_epoch:
            self._position = Position(int(epoch) + 1, 0)

    def order(self, epoch: int) -> np.ndarray:
        """Indices [examples] of epoch ``epoch``, in the order batches take them."""
        if not self.shuffle:
            return np.arange(self.num_examples)
        return np.random.default_rng([self.seed, epoch]).permutation(self.num_examples)

    def _batch(self, order: np.ndarray, step: int) -> dict[str, np.ndarray]:
        idx = order[step * self.batch_size : (step + 1) * self.batch_size]
        mask = np.ones(len(idx), np.float32)
        if self.remainder == "pad" and len(idx) < self.batch_size:
            fill = np.resize(order, self.batch_size - len(idx))  # repeats real examples, cyclically
            idx = np.concatenate([idx, fill])
            mask = np.concatenate([mask, np.zeros(len(fill), np.float32)])
        return {"x": self.x[idx], "y": self.y[idx], "mask": mask}

    def epoch(self) -> Iterator[dict[str, np.ndarray]]:
        """The remaining batches of the current epoch; the position advances with each batch and
        moves to (epoch + 1, 0) after the last one."""
        epoch, start = self._position
        order = self.order(epoch)
        steps = self.steps_per_epoch
        for step in range(start, steps):
            batch = self._batch(order, step)
            self._position = (
                Position(epoch, step + 1) if step + 1 < steps else Position(epoch + 1, 0)
            )
            yield batch

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        """Batches without end, epoch after epoch."""
        while True:
            yield from self.epoch()
