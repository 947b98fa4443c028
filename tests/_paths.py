"""Where the optional real data sets lie (../shared/data relative to the repository root); the tests
that read them are skipped when the files are not there."""

from pathlib import Path

SHARED_DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
MNIST_DIR = SHARED_DATA / "mnist"
