"""LSTM benchmark: forward and training step of one float32 layer against Flax, PyTorch and JAX peers.

    python benchmarks/lstm.py                      # full shapes, 10 rounds -> benchmarks/results/lstm.*
    python benchmarks/lstm.py --shapes small --repeats 2 --out /tmp/bench

The same as ``jaxmodels bench lstm`` (the options are its own: --repeats, --shapes, --out,
--torch-threads, --isolation), with the results next to this script by default. The harness,
contenders and shapes live in jaxmodels.bench.
"""

import sys
from pathlib import Path

from jaxmodels import cli

RESULTS = Path(__file__).resolve().parent / "results"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not any(arg == "--out" or arg.startswith("--out=") for arg in argv):
        argv += ["--out", str(RESULTS)]
    return cli.main(["bench", "lstm", *argv])


if __name__ == "__main__":
    sys.exit(main())
