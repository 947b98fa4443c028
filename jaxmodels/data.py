"""Data sets and batch iterators.

    >>> ds = get_dataset("digits")                     # ds.x_train [1437, 28, 28, 1] float32 in [0, 1]
    >>> it = BatchIterator((ds.x_train, ds.y_train), batch_size=64, seed=0)
    >>> for batch in it.epoch():                       # {"x": [64, 28, 28, 1], "y": [64], "mask": [64]}
    ...     ...
    >>> saved = it.position                            # Position(epoch, step); it.restore(saved) resumes

Arrays are host numpy arrays; placing them on devices is the trainer's (or a strategy's) job.
"""

from __future__ import annotations

import dataclasses
import gzip
import os
from pathlib import Path
from typing import Callable, Iterator, NamedTuple, Sequence

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
    """

    name: str
    task: str
    x_train: np.ndarray | None
    y_train: np.ndarray | None
    x_test: np.ndarray | None
    y_test: np.ndarray | None
    input_shape: tuple[int, ...]
    num_classes: int | None = None

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
        raise ValueError(f"expected 0 < size <= canvas with an even margin, got size={size} canvas={canvas}")
    if images.ndim != 3:
        raise ValueError(f"expected images of rank 3 [examples, height, width], got shape {images.shape}")
    with jax.default_device(jax.devices("cpu")[0]):
        resized = jax.image.resize(jnp.asarray(images, jnp.float32), (len(images), size, size), method="linear")
        resized = np.clip(np.asarray(resized), 0.0, 1.0)
    margin = (canvas - size) // 2
    out = np.zeros((len(images), canvas, canvas, 1), np.float32)
    out[:, margin : margin + size, margin : margin + size, 0] = resized
    return out


def load_digits(*, test_size: int = 360, seed: int = 0, size: int = 20, canvas: int = 28) -> Dataset:
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
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=test_size, random_state=seed, stratify=y)
    return Dataset("digits", "classification", x_train, y_train, x_test, y_test, (canvas, canvas, 1), 10)


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
        raise ValueError(f"{path} is not an IDX file: expected magic 00 00 <dtype> <rank>, got {raw[:4].hex(' ')}")
    rank = raw[3]
    header = 4 + 4 * rank
    shape = tuple(int(d) for d in np.frombuffer(raw, ">i4", count=rank, offset=4))
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    expected = header + int(np.prod(shape)) * dtype.itemsize
    if len(raw) != expected:
        raise ValueError(f"{path}: header says shape {shape} ({expected} bytes), file has {len(raw)} bytes")
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
            raise FileNotFoundError(f"no data folder given: pass data_dir (--data-dir) or set {DATA_ENV}")
    folder = Path(data_dir).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"data folder {folder} does not exist")
    return folder / subdir if (folder / subdir).is_dir() else folder


def load_mnist(data_dir: str | os.PathLike | None = None) -> Dataset:
    """MNIST from the standard IDX files (gzipped or not) in ``data_dir`` or ``$JAXMODELS_DATA``.

    Reads whichever of the train (60,000) and test (10,000) splits are present; at least one must
    be. Returns x [examples, 28, 28, 1] float32 in [0, 1] (pixel / 255) and y [examples] int32.
    """
    folder = resolve_data_dir(data_dir, "mnist")
    splits: dict[str, tuple[np.ndarray, np.ndarray] | None] = {}
    for split, (images_name, labels_name) in MNIST_FILES.items():
        images_path, labels_path = _find(folder, images_name), _find(folder, labels_name)
        if images_path is None and labels_path is None:
            splits[split] = None
            continue
        if images_path is None or labels_path is None:
            missing = images_name if images_path is None else labels_name
            raise FileNotFoundError(f"MNIST {split} split in {folder} is incomplete: missing {missing}[.gz]")
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


# ------------------------------------------------------------------------------------- registry

_REGISTRY: dict[str, Callable[..., Dataset]] = {"digits": load_digits, "mnist": load_mnist}


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
            raise ValueError(f"expected x and y with the same number of examples, got {len(x)} and {len(y)}")
        if remainder not in REMAINDERS:
            raise ValueError(f"unknown remainder policy {remainder!r}; expected one of {REMAINDERS}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size <= 0:
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
        epoch, step = (position["epoch"], position["step"]) if isinstance(position, dict) else position
        if epoch < 0 or not 0 <= step <= self.steps_per_epoch:
            raise ValueError(f"expected epoch >= 0 and 0 <= step <= {self.steps_per_epoch}, got ({epoch}, {step})")
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
            self._position = Position(epoch, step + 1) if step + 1 < steps else Position(epoch + 1, 0)
            yield batch

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        """Batches without end, epoch after epoch."""
        while True:
            yield from self.epoch()
