"""Largest error of each Pallas kernel against its jnp reference, per dtype, forward and gradient.

Runs the kernels as the platform runs them (interpreted on CPU, compiled on GPU/TPU) over a grid of
shapes that includes sizes that are not multiples of the blocks, with small and default block
sizes. Error = max |kernel - reference| / max |reference| per output (or gradient) array, the
largest over arrays and shapes. Writes benchmarks/results/kernel_accuracy.{json,md}.

    python benchmarks/kernel_accuracy.py
"""

import functools
import json
from pathlib import Path

import jax
import jax.numpy as jnp

from jaxmodels.kernels import dense as dense_kernel
from jaxmodels.kernels import lstm_cell as cell_kernel
from jaxmodels.kernels import lstm_sequence as sequence_kernel
from jaxmodels.kernels.dense import dense, dense_reference
from jaxmodels.kernels.lstm_cell import lstm_cell, lstm_cell_reference
from jaxmodels.kernels.lstm_sequence import lstm_sequence, lstm_sequence_reference
from jaxmodels.kernels.lstm_stepwise import lstm_stepwise, lstm_stepwise_reference

# Each kernel's blocks: small ones (several programs and padding at these shapes), then the
# backend's defaults (None). lstm_stepwise runs the lstm_cell kernel and takes its blocks.
SMALL_BLOCKS = {
    "dense": dense_kernel.BlockSizes(block_m=8, block_n=8, block_k=8),
    "lstm_cell": cell_kernel.BlockSizes(block_batch=8, block_hidden=8, block_contraction=8),
    "lstm_sequence": sequence_kernel.BlockSizes(block_batch=8, block_time=4, hidden_multiple=8),
}
BLOCKS = [SMALL_BLOCKS, dict.fromkeys(SMALL_BLOCKS)]
DENSE = [(5, 13, 19, "relu"), (17, 9, 24, "tanh"), (3, 30, 7, "sigmoid"), (33, 70, 130, "identity")]
CELL = [(5, 12), (8, 8), (20, 130)]
SEQUENCE = [(7, 5, 6, [7, 3, 0, 5, 1], False), (5, 9, 12, None, True), (12, 20, 130, None, False)]


def relative_error(a, b) -> float:
    return max(
        float(
            jnp.max(jnp.abs(x.astype(jnp.float32) - y.astype(jnp.float32)))
            / jnp.maximum(jnp.max(jnp.abs(y.astype(jnp.float32))), 1e-30)
        )
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))
    )


def sin_loss(fn):
    return lambda *args: sum(
        jnp.sum(jnp.sin(z.astype(jnp.float32))) for z in jax.tree.leaves(fn(*args))
    )


def compare(kernel, reference, args):
    """(forward error, gradient error) of kernel vs reference on args."""
    argnums = tuple(range(len(args)))
    forward = relative_error(jax.jit(kernel)(*args), reference(*args))
    grads = jax.jit(jax.grad(sin_loss(kernel), argnums))(*args)
    return forward, relative_error(grads, jax.grad(sin_loss(reference), argnums)(*args))


def cases(dtype, blocks):
    keys = jax.random.split(jax.random.key(1), 4)
    rand = lambda k, shape, scale=1.0: (scale * jax.random.normal(k, shape)).astype(dtype)
    for rows, features, out, act in DENSE:
        args = (
            rand(keys[0], (rows, features)),
            rand(keys[1], (features, out), 0.3),
            rand(keys[2], (out,)),
        )
        kernel = functools.partial(dense, activation=act, block_sizes=blocks["dense"])
        yield "dense", kernel, functools.partial(dense_reference, activation=act), args
    for batch, hidden in CELL:
        carry = (rand(keys[2], (batch, hidden)), rand(keys[3], (batch, hidden)))
        args = (rand(keys[0], (batch, 4 * hidden)), rand(keys[1], (hidden, 4 * hidden), 0.4), carry)
        yield (
            "lstm_cell",
            functools.partial(lstm_cell, block_sizes=blocks["lstm_cell"]),
            lstm_cell_reference,
            args,
        )
    for time, batch, hidden, lengths, reverse in SEQUENCE:
        carry = (rand(keys[2], (batch, hidden)), rand(keys[3], (batch, hidden)))
        args = (
            rand(keys[0], (time, batch, 4 * hidden)),
            rand(keys[1], (hidden, 4 * hidden), 0.4),
            carry,
        )
        lengths = None if lengths is None else jnp.array(lengths, jnp.int32)
        for name, recurrence, reference, recurrence_blocks in (
            ("lstm_sequence", lstm_sequence, lstm_sequence_reference, blocks["lstm_sequence"]),
            ("lstm_stepwise", lstm_stepwise, lstm_stepwise_reference, blocks["lstm_cell"]),
        ):
            kernel = functools.partial(
                recurrence, seq_lengths=lengths, reverse=reverse, block_sizes=recurrence_blocks
            )
            specification = functools.partial(reference, seq_lengths=lengths, reverse=reverse)
            yield name, kernel, specification, args


def main():
    results = {}
    for dtype in (jnp.float32, jnp.bfloat16):
        for blocks in BLOCKS:
            for name, kernel, reference, args in cases(dtype, blocks):
                forward, gradient = compare(kernel, reference, args)
                row = results.setdefault(
                    f"{name} {jnp.dtype(dtype).name}", {"forward": 0.0, "gradient": 0.0, "cases": 0}
                )
                row["forward"], row["gradient"] = (
                    max(row["forward"], forward),
                    max(row["gradient"], gradient),
                )
                row["cases"] += 1
    meta = {"backend": jax.default_backend(), "jax": jax.__version__}
    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    (out / "kernel_accuracy.json").write_text(
        json.dumps({"meta": meta, "results": results}, indent=2)
    )
    lines = [
        "# Kernel accuracy against the jnp references",
        "",
        f"backend {meta['backend']}, jax {meta['jax']}; `python benchmarks/kernel_accuracy.py`. "
        "Error = max |kernel - reference| / max |reference| per array, largest over arrays and shapes.",
        "",
        "| kernel dtype | forward | gradient | cases |",
        "|---|---:|---:|---:|",
    ]
    lines += [
        f"| {k} | {v['forward']:.3g} | {v['gradient']:.3g} | {v['cases']} |"
        for k, v in results.items()
    ]
    (out / "kernel_accuracy.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
