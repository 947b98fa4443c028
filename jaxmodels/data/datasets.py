"""Data sets by name, as host numpy arrays (batching: ``jaxmodels.training.batches``).

    >>> ds = get_dataset("digits")
    >>> ds.x_train.shape, ds.x_train.dtype, ds.num_classes     # float32 in [0, 1]
    ((1437, 28, 28, 1), dtype('float32'), 10)

Data sets (``list_datasets()``): images for ``cnn``: "digits" (bundled), "mnist" (IDX files;
``jaxmodels.data.mnist.download_mnist`` fetches them); sequences for the ``*-classifier`` models:
"seq-mnist", "seq-digits" (image rows as time steps); for the ``*-regressor`` models: "adding";
for ``char-lstm``: "copy" and "text" (character-level language modelling over a UTF-8 file).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from jaxmodels.data.mnist import download_mnist, read_mnist, resolve_data_dir
from jaxmodels.data.synthetic import COPY_BLANK, adding_problem, copy_problem


@dataclasses.dataclass(frozen=True)
class Dataset:
    """A data set held in host memory.

    Attributes:
      name: registry name.
      task: "classification", "regression" or "language_model" (matches ``Model.task``).
      x_train, y_train: inputs ``[examples, *input_shape]`` and targets [examples, ...]; None when the
        split is absent (e.g. a folder with only MNIST's test files).
      x_test, y_test: the same for the test split.
      input_shape: shape of one input, e.g. (28, 28, 1) [height, width, channels].
      num_classes: number of classes (classification) or vocabulary size (language model), else None.
      vocab: for token data, the string of each token id (``vocab[i]`` is token i), else None;
        ``encode`` / ``decode`` use it.
      info: facts about how the data was made or what scores mean (e.g. seq_len, seed,
        "baseline_loss" of a synthetic task, the data_dir read); JSON-friendly values.
      options: the ``get_dataset`` options it was loaded with, defaults included (paths absolute,
        download left out): ``get_dataset(name, **options)`` loads it again; fit records them.
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
    options: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def head(self, train: int | None = None, test: int | None = None) -> Dataset:
        """This data set with only the first ``train`` training and ``test`` test examples
        (None: all), e.g. a quick run on the first 1,000 MNIST images."""
        for name, n in (("train", train), ("test", test)):
            if n is not None and (not isinstance(n, int) or n < 1):
                raise ValueError(f"expected {name} to be None or an integer >= 1, got {n!r}")
        cut = lambda a, n: a if a is None or n is None else a[:n]
        return dataclasses.replace(
            self,
            x_train=cut(self.x_train, train),
            y_train=cut(self.y_train, train),
            x_test=cut(self.x_test, test),
            y_test=cut(self.y_test, test),
        )

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
    splits = read_mnist(folder)
    train, test = splits["train"] or (None, None), splits["test"] or (None, None)
    shape = next(s for s in splits.values() if s is not None)[0].shape[1:]
    info = {"data_dir": str(folder.absolute())}
    return Dataset("mnist", "classification", *train, *test, tuple(shape), 10, info=info)


# --------------------------------------------------------------- sequential images (rows as time)

SEQUENCE_STEPS = ("rows", "pixels")


def _as_sequences(ds: Dataset, name: str, steps: str, permute: int | None) -> Dataset:
    """Images [examples, height, width, 1] -> sequences for the ``*-classifier`` models: "rows" gives
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
    if permute is not None and (
        not isinstance(permute, int) or isinstance(permute, bool) or permute < 0
    ):
        raise ValueError(
            f"expected permute to be None or a seed (an integer >= 0), got {permute!r}"
        )
    shape = (height, width) if steps == "rows" else (height * width, 1)
    order = None if permute is None else np.random.default_rng(permute).permutation(shape[0])

    def convert(x: np.ndarray | None) -> np.ndarray | None:
        if x is None:
            return None
        seq = x.reshape(len(x), *shape)
        return seq if order is None else seq[:, order]

    info = {**ds.info, "source": ds.name, "steps": steps, "permute": permute}
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
    splits, time = (x_train, y_train, x_test, y_test), seq_len + 2 * memory
    return Dataset("copy", "language_model", *splits, (time,), alphabet + 2, vocab, info)


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
    if path.is_dir():
        raise IsADirectoryError(f"text file {path} is a folder; expected a UTF-8 file")
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
    splits = (x_train, y_train, x_test, y_test)
    return Dataset("text", "language_model", *splits, (seq_len,), len(vocab), vocab, info)


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

# What each data set holds, known without loading it: (task, inputs); inputs "images" [height,
# width, channels], "sequences" [time, features] or "tokens" [time] (integer ids).
DATASET_KINDS = {
    "digits": ("classification", "images"),
    "mnist": ("classification", "images"),
    "seq-mnist": ("classification", "sequences"),
    "seq-digits": ("classification", "sequences"),
    "adding": ("regression", "sequences"),
    "copy": ("language_model", "tokens"),
    "text": ("language_model", "tokens"),
}
_PATH_OPTIONS = ("data_dir", "path")


def list_datasets() -> tuple[str, ...]:
    """Names accepted by ``get_dataset``."""
    return tuple(_REGISTRY)


def dataset_options(name: str) -> dict[str, Any]:
    """The keyword options that data set ``name``'s loader takes (seq-digits: digits' too), each
    with its default (None where it has none); e.g. for "seq-mnist": data_dir None, steps "rows",
    permute None, download False."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown dataset {name!r}; expected one of {list_datasets()}")
    loaders = (_REGISTRY[name], load_digits) if name == "seq-digits" else (_REGISTRY[name],)
    params = [p for f in loaders for p in inspect.signature(f).parameters.values()]
    return {
        p.name: None if p.default is p.empty else p.default
        for p in params
        if p.kind is not p.VAR_KEYWORD
    }


def get_dataset(name: str, **opts) -> Dataset:
    """The registered data set ``name``; ``opts`` go to its loader (e.g. ``data_dir`` for mnist)
    and are kept in its ``options``. An option it does not take is a TypeError naming those it
    does."""
    unknown = sorted(set(opts) - set(dataset_options(name)))
    if unknown:
        raise TypeError(
            f"bad options for dataset {name!r}: it takes no {', '.join(unknown)}; its options: "
            f"{', '.join(dataset_options(name))}"
        )
    dataset = _REGISTRY[name](**opts)
    params = inspect.signature(_REGISTRY[name]).parameters.values()
    kept = {p.name: p.default for p in params if p.default is not p.empty} | opts
    kept.pop("download", None)
    for k in _PATH_OPTIONS:
        if kept.get(k) is not None:
            kept[k] = str(Path(kept[k]).expanduser().absolute())
    return dataclasses.replace(dataset, options=kept)
