"""A latency model of the LSTM's time step on H100 and A100: an **estimate**, for the device run.

    python benchmarks/latency_model.py [--out benchmarks/results]

No GPU has run our kernels yet (``benchmarks/accelerators.py`` is ready for the first one). This
says, from the kernels' own plans for each target (``lstm_sequence.plan``, ``grid.plan``: which
program keeps which slice of w_h on chip) and the data sheets, how long one step of the recurrence
should take on its critical path for each path ``lstm_scan`` can take, and so which should win
where. Per step, forward (the backward's recurrent products are twice the forward's, with the
same launches, reads and barriers, so it moves the compute terms only):

- ``scan`` (XLA's while loop): ``SCAN_KERNELS`` launches a step (the [B, H] x [H, 4H] product,
  the gates' fusion, the stacked outputs' update), each ``LAUNCH_S``, plus the product: its FLOPs
  over the SMs its 128x128 output tiles occupy (``tiles``), or w_h read from L2 (HBM when w_h does
  not fit in L2) at the data sheet's bandwidth, whichever is longer;
- ``stepwise`` (``lstm_stepwise``: one Pallas kernel a step): one launch, and the same product;
- ``persistent`` (``lstm_sequence``: one program per batch block of 16 rows keeps all of w_h in
  shared memory, where it fits): no launch; the block's product on one SM's tensor cores, or w_h
  read from shared memory (``SMEM_BYTES_PER_CYCLE`` an SM), whichever is longer;
- ``grid`` (``lstm_grid``: program p of a batch group keeps w_h's columns of its 16 units; where
  the plan fits): the program's slice of the product on its SM, or its slice of w_h from shared
  memory, plus reading all of h_{t-1} from L2 (``L2_LATENCY_S``) and the grid barrier
  (``BARRIER_S``: an atomic on one L2 counter and the poll that sees the last arrival). Batch
  groups that do not fit one launch's SMs run in launches one after another, each over all steps.

The input projection x W_x (one matmul over all steps) and the weight gradient (one matmul after)
are off the critical path of the steps and left out. Every figure but the data sheets' is an
assumption, stated in ``ASSUMPTIONS`` and in the report; the device run will say how far off they
are. Published anchors stand beside the estimates (``ANCHORS``).

Writes OUT/latency_model.json and .md.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax.numpy as jnp

from jaxmodels import records, targets
from jaxmodels.kernels import grid, lstm_sequence

RESULTS = Path(__file__).resolve().parent / "results"
GPUS = ("h100", "a100")
# Dense tensor-core peaks (FLOP/s) from NVIDIA's data sheets (H100 SXM5, A100 SXM4 80GB), without
# sparsity: float32 matmuls run as TF32 at JAX's default precision, in XLA and in the kernels.
TENSOR_PEAK = {
    "h100": {"float32": 494.7e12, "bfloat16": 989.4e12},
    "a100": {"float32": 156e12, "bfloat16": 312e12},
}
# (SMs, clock GHz, L2 bytes) from the XLA target descriptions in jaxmodels/gpu_targets/.
GPU_SPEC = {"h100": (132, 1.98, 52428800), "a100": (108, 1.41, 41943040)}
LAUNCH_S = 3e-6  # a kernel launch of a while loop's body, back to back (assumed)
SCAN_KERNELS = 3  # kernels an XLA scan step launches: the product, the gates, the outputs' update
L2_BANDWIDTH_FACTOR = 2.0  # L2 bandwidth as a multiple of HBM's (assumed; not on the data sheets)
L2_LATENCY_S = 0.5e-6  # a dependent read of h_{t-1} from L2 (assumed; ~600-1000 cycles)
BARRIER_S = (
    1.0e-6  # the grid barrier: an acq_rel atomic on L2 and the poll that sees the last (assumed)
)
SMEM_BYTES_PER_CYCLE = 128  # shared memory bandwidth of one SM (32 banks x 4 bytes)
TILE = 128  # the output tile of a cuBLAS / Pallas product: one SM each
ASSUMPTIONS = {
    "launch_s": LAUNCH_S,
    "scan_kernels_per_step": SCAN_KERNELS,
    "l2_bandwidth_factor_of_hbm": L2_BANDWIDTH_FACTOR,
    "l2_latency_s": L2_LATENCY_S,
    "barrier_s": BARRIER_S,
    "smem_bytes_per_cycle_per_sm": SMEM_BYTES_PER_CYCLE,
    "tile": TILE,
}
# (hidden, batch, time, dtype, where the shape comes from)
SHAPES = (
    (256, 64, 150, "float32", "DeepBench"),
    (1024, 64, 25, "float32", "DeepBench"),
    (128, 128, 784, "float32", "pixel MNIST"),
    (64, 64, 150, "float32", "fits one SM"),
    (768, 16, 1024, "bfloat16", "FlashRNN"),
    (1024, 64, 25, "bfloat16", "DeepBench"),
)
ANCHORS = (
    "DeepBench (Baidu, 2017), cuDNN LSTM forward on a V100 in float32: (256, 64, 150) about 45 µs "
    "a step; (batch 1) about 13 µs a step on a Titan Xp.",
    "FlashRNN (Pöppel, Beck and Hochreiter 2024, arXiv:2412.07752), cuDNN LSTM on an H100 in "
    "bfloat16 at (768, 16, 1024): 2.01 ms forward (1.96 µs a step), 5.19 ms forward+backward.",
)
PATHS = ("scan", "stepwise", "persistent", "grid")


def tiles(batch: int, columns: int) -> int:
    """Output tiles of a [batch, columns] product: the SMs it can occupy."""
    return math.ceil(batch / TILE) * math.ceil(columns / TILE)


def product_s(gpu: str, dtype: str, batch: int, hidden: int) -> float:
    """One step's [batch, hidden] x [hidden, 4·hidden] product as a separate kernel: its FLOPs over
    the SMs its tiles occupy, or w_h from L2 (HBM where it does not fit), the longer."""
    sms, _, l2 = GPU_SPEC[gpu]
    flops = 2 * batch * hidden * 4 * hidden
    per_sm = TENSOR_PEAK[gpu][dtype] / sms
    compute = flops / (per_sm * min(sms, tiles(batch, 4 * hidden)))
    weights = 4 * hidden * hidden * jnp.dtype(dtype).itemsize
    bandwidth = targets.TARGETS[gpu].bandwidth
    bandwidth *= L2_BANDWIDTH_FACTOR if weights <= l2 else 1.0
    return max(compute, weights / bandwidth)


def on_chip_s(gpu: str, dtype: str, rows: int, hidden: int, units: int) -> float:
    """A program's share of a step with its w_h slice [hidden, 4·units] in shared memory: its
    FLOPs on one SM's tensor cores, or the slice read from shared memory, the longer."""
    sms, ghz, _ = GPU_SPEC[gpu]
    compute = 2 * rows * hidden * 4 * units / (TENSOR_PEAK[gpu][dtype] / sms)
    read = 4 * units * hidden * jnp.dtype(dtype).itemsize / (SMEM_BYTES_PER_CYCLE * ghz * 1e9)
    return max(compute, read)


def step_estimates(gpu: str, hidden: int, batch: int, dtype: str) -> dict:
    """Seconds per forward step on each path (None where the path's plan does not fit), and the
    plans' facts (programs, shared memory)."""
    kind = jnp.dtype(dtype)
    with targets.on_device(gpu):
        persistent = lstm_sequence.plan(hidden, kind, "triton")
        grid_plan = grid.plan(hidden, kind, "triton")
        smem = grid.shared_memory_bytes(grid_plan.hidden_p, kind) if grid_plan else None
    product = product_s(gpu, dtype, batch, hidden)
    out = {
        "scan": SCAN_KERNELS * LAUNCH_S + product,
        "stepwise": LAUNCH_S + product,
        "persistent": None,
        "grid": None,
        "grid_programs": None,
        "grid_launches": None,
        "grid_shared_memory": smem,
    }
    if persistent is not None:
        out["persistent"] = on_chip_s(gpu, dtype, min(batch, 16), hidden, hidden)
    if grid_plan is not None:
        rows, units = grid_plan.block_batch, grid_plan.block_hidden
        out["grid"] = on_chip_s(gpu, dtype, rows, grid_plan.hidden_p, units)
        out["grid"] += L2_LATENCY_S + BARRIER_S
        groups = math.ceil(batch / rows)
        out["grid_programs"] = grid_plan.slices * min(groups, grid_plan.groups_per_launch)
        out["grid_launches"] = math.ceil(groups / grid_plan.groups_per_launch)
    return out


def model() -> list[dict]:
    rows = []
    for gpu in GPUS:
        for hidden, batch, time_, dtype, source in SHAPES:
            est = step_estimates(gpu, hidden, batch, dtype)
            # the sequence: T steps, the grid's once per launch
            sequence = {p: est[p] * time_ for p in PATHS if est[p] is not None}
            if "grid" in sequence:
                sequence["grid"] *= est["grid_launches"]
            winner = min(sequence, key=sequence.get)
            rows.append(
                {
                    "gpu": gpu,
                    "hidden": hidden,
                    "batch": batch,
                    "time": time_,
                    "dtype": dtype,
                    "source": source,
                    **{f"{p}_us": None if est[p] is None else est[p] * 1e6 for p in PATHS},
                    "grid_programs": est["grid_programs"],
                    "grid_launches": est["grid_launches"],
                    "grid_shared_memory": est["grid_shared_memory"],
                    "sequence_ms": {p: t * 1e3 for p, t in sequence.items()},
                    "fastest": winner,
                }
            )
    return rows


def markdown(result: dict) -> str:
    a = result["assumptions"]
    lines = [
        "# Latency model of one LSTM step on H100 and A100 (an estimate)",
        "",
        f"{result['environment']['date']}; git {result['environment'].get('git_commit')}; "
        "regenerate with `python benchmarks/latency_model.py`. **Estimates, not measurements**: "
        "no GPU has run these kernels yet; `benchmarks/accelerators.py` measures them on the "
        "first device lent.",
        "",
        "Per forward step on its critical path, µs: `scan` = "
        f"{a['scan_kernels_per_step']} launches x {a['launch_s'] * 1e6:g} µs + the product; "
        f"`stepwise` = 1 launch + the product; the product = max(FLOPs over the SMs its "
        f"{a['tile']}x{a['tile']} tiles occupy at the dense tensor-core peak, w_h from L2 at "
        f"{a['l2_bandwidth_factor_of_hbm']:g}x HBM bandwidth or from HBM); `persistent` = max(a "
        "16-row block's product on one SM, w_h from shared memory at "
        f"{a['smem_bytes_per_cycle_per_sm']} B/cycle); `grid` = the same for a program's 16 "
        f"units + an L2 read of h_(t-1) ({a['l2_latency_s'] * 1e6:g} µs) + the barrier "
        f"({a['barrier_s'] * 1e6:g} µs). Launch, L2 and barrier figures are assumptions; SMs, "
        "clocks, L2 size and HBM bandwidth are the XLA target descriptions', peaks the data "
        "sheets' (float32 as TF32). Blank: the path's plan does not fit that GPU.",
        "",
        "| GPU | (H, B, T) | dtype | shape from | scan | stepwise | persistent | grid | grid "
        "programs x launches | fastest | its sequence, ms |",
        "| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | --- | ---: |",
    ]
    fmt = lambda v: "" if v is None else f"{v:.2f}"
    for r in result["rows"]:
        programs = f"{r['grid_programs']} x {r['grid_launches']}" if r["grid_programs"] else ""
        lines.append(
            f"| {r['gpu']} | ({r['hidden']}, {r['batch']}, {r['time']}) | {r['dtype']} | "
            f"{r['source']} | {fmt(r['scan_us'])} | {fmt(r['stepwise_us'])} | "
            f"{fmt(r['persistent_us'])} | {fmt(r['grid_us'])} | {programs} | {r['fastest']} | "
            f"{r['sequence_ms'][r['fastest']]:.3f} |"
        )
    lines += ["", "Published anchors (measured by others, other devices or libraries):", ""]
    lines += [f"- {anchor}" for anchor in result["anchors"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=RESULTS, help="results folder")
    args = parser.parse_args(argv)
    result = {
        "environment": records.environment(frameworks=("jax",)),
        "assumptions": ASSUMPTIONS,
        "tensor_peak": TENSOR_PEAK,
        "gpu_spec": {
            g: dict(zip(("sms", "clock_ghz", "l2_bytes"), s)) for g, s in GPU_SPEC.items()
        },
        "anchors": list(ANCHORS),
        "rows": model(),
    }
    paths = records.write_results(result, args.out, "latency_model", render_markdown=markdown,
                                  render_png=None)  # fmt: skip
    print(markdown(result))
    print("wrote " + ", ".join(str(p) for p in paths), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
