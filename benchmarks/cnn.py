"""CNN benchmark: the seed CNN's training step (Adam) and inference against PyTorch and plain Flax.

    python benchmarks/cnn.py                       # full shapes, 10 rounds -> benchmarks/results/cnn.*
    python benchmarks/cnn.py --shapes small --repeats 2 --out /tmp/bench

The harness, contenders and batch sizes live in jaxmodels.bench (also: ``jaxmodels bench cnn``).
"""

import sys
from pathlib import Path

from jaxmodels import bench

if __name__ == "__main__":
    sys.exit(bench.script_main("cnn", default_out=Path(__file__).resolve().parent / "results"))
