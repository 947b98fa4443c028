"""MNIST's files: the IDX format, where the files are, their published checksums, and the download.

    download_mnist("~/data")                     # ~/data/mnist/*.gz, verified by SHA-256
    splits = read_mnist("~/data")                # {"train": (x, y), "test": (x, y)}

``jaxmodels.data.datasets.load_mnist`` turns the splits into a ``Dataset``.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import urllib.request
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np

DATA_ENV = "JAXMODELS_DATA"  # the data folder when none is given

MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}

_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


REFETCH = "remove it and fetch it again (download=True, --download)"


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (gzipped when the name ends in .gz): magic 0x0000 <dtype> <rank>, then
    ``rank`` big-endian int32 dimensions, then the data in row-major order. A truncated or corrupt
    file is a ValueError naming it and how to fetch it again."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (EOFError, zlib.error, gzip.BadGzipFile) as err:
        raise ValueError(
            f"{path} is truncated or corrupt ({type(err).__name__}: {err}); {REFETCH}"
        ) from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise ValueError(
            f"{path} is not an IDX file: expected magic 00 00 <dtype> <rank>, got "
            f"{raw[:4].hex(' ')}; {REFETCH}"
        )
    rank = raw[3]
    header = 4 + 4 * rank
    shape = tuple(int(d) for d in np.frombuffer(raw, ">i4", count=rank, offset=4))
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    expected = header + int(np.prod(shape)) * dtype.itemsize
    if len(raw) != expected:
        raise ValueError(
            f"{path}: header says shape {shape} ({expected} bytes), file has {len(raw)} bytes; "
            f"{REFETCH}"
        )
    return np.frombuffer(raw, dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def find_file(folder: Path, stem: str) -> Path | None:
    """``folder/stem`` or ``folder/stem.gz``, whichever exists (None: neither)."""
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
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(f"data folder {folder} is a file, not a folder")
    if not folder.is_dir():
        raise FileNotFoundError(f"data folder {folder} does not exist")
    return folder / subdir if (folder / subdir).is_dir() else folder


def read_mnist(
    data_dir: str | os.PathLike | None = None,
) -> dict[str, tuple[np.ndarray, np.ndarray] | None]:
    """The MNIST splits present in ``data_dir`` (else ``$JAXMODELS_DATA``; its "mnist" subfolder
    when there is one): {"train": (x, y) or None, "test": ...}, x [examples, 28, 28, 1] float32 in
    [0, 1] (pixel / 255), y [examples] int32. At least one split must be present; a split with one
    of its two files missing is an error naming it."""
    folder = resolve_data_dir(data_dir, "mnist")
    splits: dict[str, tuple[np.ndarray, np.ndarray] | None] = {}
    for split, (images_name, labels_name) in MNIST_FILES.items():
        images_path, labels_path = find_file(folder, images_name), find_file(folder, labels_name)
        if images_path is None and labels_path is None:
            splits[split] = None
            continue
        if images_path is None or labels_path is None:
            missing = images_name if images_path is None else labels_name
            raise FileNotFoundError(
                f"MNIST {split} split in {folder} is incomplete: missing {missing}[.gz]; fetch it "
                f"with download=True (--download)"
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
        raise FileNotFoundError(
            f"no MNIST files in {folder}; expected {expected}; fetch them with download=True "
            f"(--download)"
        )
    return splits


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
    if root.name == "mnist" or any(
        find_file(root, n) for pair in MNIST_FILES.values() for n in pair
    ):
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
    mirrors: Sequence[str] | None = None,
    timeout: float = 60.0,
) -> Path:
    """Download MNIST's IDX files for ``splits`` into ``data_dir`` (else ``$JAXMODELS_DATA``) and
    verify their SHA-256 (``MNIST_SHA256``); returns the folder written, which ``load_mnist(data_dir)``
    reads: ``data_dir/mnist`` (created when needed) unless ``data_dir`` is named "mnist" or already
    holds MNIST files.

    Files already there are checked, not fetched again; one that fails the check is an error (it is
    never overwritten). Each missing file is tried on each mirror in turn (``mirror + name + ".gz"``,
    http(s) or file://; ``MNIST_MIRRORS`` by default), written under a temporary name and renamed
    once verified.

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
    mirrors = MNIST_MIRRORS if mirrors is None else mirrors
    folder = _mnist_target_folder(Path(data_dir).expanduser())
    folder.mkdir(parents=True, exist_ok=True)
    for split in splits:
        for name in MNIST_FILES[split]:
            existing = find_file(folder, name)
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
