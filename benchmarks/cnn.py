"""CNN benchmark: the seed CNN's training step (Adam) and inference against PyTorch and plain Flax.

    python benchmarks/cnn.py                      # full shapes, 10 rounds -> benchmarks/results/cnn.*
    python benchmarks/cnn.py --shapes small --repeats 2 --out /tmp/bench

The same as ``jaxmodels bench cnn`` (the options are its own: --repeats, --shapes, --out,
--torch-threads, --isolation), with the results next to this script by default. The harness,
contenders and batch sizes live in jaxmodels.bench.
"""

import sys
from pathlib import Path

from jaxmodels import cli

RESULTS = Path(__file__).resolve().parent / "results"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not any(arg == "--out" or arg.startswith("--out=") for arg in argv):
        argv += ["--out", str(RESULTS)]
    return cli.main(["bench", "cnn", *argv])


if __name__ == "__main__":
    sys.exit(main())
