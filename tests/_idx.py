"""Tiny MNIST IDX files for tests: the format of the originals, random content."""

import gzip
from pathlib import Path

import numpy as np


def write_idx(path: Path, array: np.ndarray, code: int) -> None:
    """``array`` as an IDX file (type ``code``, e.g. 0x08 unsigned bytes), gzipped for a .gz path."""
    header = bytes([0, 0, code, array.ndim]) + np.asarray(array.shape, ">i4").tobytes()
    data = header + array.astype(array.dtype.newbyteorder(">")).tobytes()
    if path.suffix == ".gz":
        with gzip.open(path, "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)


def tiny_mnist(folder: Path, gz: bool, splits=("train", "test"), sizes=(7, 3)) -> dict:
    """MNIST's file names in ``folder`` with ``sizes`` (training, test) random images and labels;
    returns {split: (images [n, 28, 28] uint8, labels [n] uint8)}."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    ext = ".gz" if gz else ""
    arrays = {}
    for split, prefix, n in zip(("train", "test"), ("train", "t10k"), sizes):
        if split not in splits:
            continue
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, n, dtype=np.uint8)
        write_idx(folder / f"{prefix}-images-idx3-ubyte{ext}", images, 0x08)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte{ext}", labels, 0x08)
        arrays[split] = (images, labels)
    return arrays
