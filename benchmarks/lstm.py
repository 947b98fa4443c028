"""LSTM benchmark: forward and training step of one float32 layer against Flax, PyTorch and JAX peers.

    python benchmarks/lstm.py                      # full shapes, 10 rounds -> benchmarks/results/lstm.*
    python benchmarks/lstm.py --shapes small --repeats 2 --out /tmp/bench

The harness, contenders and shapes live in jaxmodels.bench (also: ``jaxmodels bench lstm``).
"""

import sys
from pathlib import Path

from jaxmodels import bench

if __name__ == "__main__":
    sys.exit(bench.script_main("lstm", default_out=Path(__file__).resolve().parent / "results"))
