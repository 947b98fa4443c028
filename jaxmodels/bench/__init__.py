"""The benchmark harness and the standard suites (``jaxmodels bench``, ``benchmarks/*.py``).

    jaxmodels bench lstm --repeats 10            # writes benchmarks/results/lstm.{json,md,png}
    jaxmodels bench all --shapes small --out /tmp/bench
    jaxmodels bench cnn --isolation shared       # everything in one process, as before the pool

Every framework is timed as its users run it, in its own process: one worker process for all JAX
contenders, one per PyTorch configuration (C allocator as installed, jemalloc, tcmalloc; the CPU
count of threads and one), the parent interleaving their samples round by round.

One idea per module:

- ``timing``: what is timed (Contender, Workload, Suite), setting up and sampling a contender,
  waiting on results, the interleaved rounds (``time_workload``), the matmul peak;
- ``torch_configs``: the PyTorch configurations (allocator libraries, thread counts, names);
- ``pool`` and ``worker``: the worker processes, parent side and child side;
- ``runner``: running suites (``run_suite``, ``run``), ratios, the files;
- ``report``: markdown and PNG;
- ``lstm``, ``cnn``: the suites (shapes, FLOP counts, contenders); ``torch_models``: their PyTorch
  side, importable without jax.
"""

from jaxmodels.bench.cnn import (
    CNN_BATCHES,
    CNN_PLAIN,
    CNN_TORCH,
    cnn_contenders,
    cnn_flops,
    cnn_suite,
    cnn_variants,
)
from jaxmodels.bench.lstm import (
    LSTM_CPU,
    LSTM_FLAX,
    LSTM_NAIVE,
    LSTM_PALLAS,
    LSTM_SCAN,
    LSTM_SHAPES,
    LSTM_TORCH,
    lstm_contenders,
    lstm_flops,
    lstm_suite,
)
from jaxmodels.bench.pool import Pool, Timeouts
from jaxmodels.bench.report import markdown, plot
from jaxmodels.bench.runner import ISOLATIONS, SHAPE_SETS, SUITES, build_suite, run, run_suite
from jaxmodels.bench.timing import (
    DTYPES,
    PEAK_N,
    Contender,
    InProcess,
    Suite,
    Workload,
    measure_peak,
    time_workload,
)
from jaxmodels.bench.torch_configs import ALLOCATORS, find_library

__all__ = [
    "ALLOCATORS",
    "CNN_BATCHES",
    "CNN_PLAIN",
    "CNN_TORCH",
    "DTYPES",
    "ISOLATIONS",
    "LSTM_CPU",
    "LSTM_FLAX",
    "LSTM_NAIVE",
    "LSTM_PALLAS",
    "LSTM_SCAN",
    "LSTM_SHAPES",
    "LSTM_TORCH",
    "PEAK_N",
    "SHAPE_SETS",
    "SUITES",
    "Contender",
    "InProcess",
    "Pool",
    "Suite",
    "Timeouts",
    "Workload",
    "build_suite",
    "cnn_contenders",
    "cnn_flops",
    "cnn_suite",
    "cnn_variants",
    "find_library",
    "lstm_contenders",
    "lstm_flops",
    "lstm_suite",
    "markdown",
    "measure_peak",
    "plot",
    "run",
    "run_suite",
    "time_workload",
]
