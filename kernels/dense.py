"""Fused dense layer: y = f(x W + b) as one blocked matmul with bias and activation in the epilogue.

With x [M, K], W [K, N] and y [M, N], the grid runs over (M / block_m, N / block_n) tiles of y;
each program accumulates x[tile rows, :] W[:, tile columns] in float32 over slices of block_k of
the contraction K, then adds b and applies f before the single store. The backward pass reuses
the same kernel: δpre = δy ⊙ f'(y) (f' from the saved output), δx = δpre Wᵀ and δW = xᵀ δpre as
two more blocked matmuls, δb = Σ_rows δpre.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from jaxmodels.kernels.common import (
    ACTIVATIONS,
    check_activation,
    check_block_sizes,
    check_float,
    compiler_params,
    dot_f32,
    on_platforms,
    pad_to,
    round_up,
)

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tiles of the matmul y [M, N] = f(x [M, K] W [K, N] + b), each a power of two. The
    backward's matmuls δx = δpre Wᵀ and δW = xᵀ δpre are tiled alike, with their own M, N, K.
    Shapes that are not multiples are zero-padded inside.

    Attributes:
      block_m: rows of y per program.
      block_n: columns of y per program.
      block_k: width of each slice of the contraction K that a program's loop multiplies.
    """

    block_m: int
    block_n: int
    block_k: int

    def __post_init__(self):
        check_block_sizes(self)

    @classmethod
    def get_default(cls, backend: str) -> BlockSizes:
        """Tiles for ``backend`` (see ``common.BACKENDS``). Triton: 32 x 64 with slices of 32,
        chosen by compiling every shape of tests/test_compile.py for H100 and A100 without a
        register spill (16 x 128 with slices of 128 spilled in float32 on A100 at K = 3072, 16 x 64
        with slices of 64 in bfloat16 on H100 at K = 256). Mosaic and the interpreter: 16 x 128
        (whole (8, 128) tiles) with slices of 128."""
        if backend == "triton":
            return cls(block_m=32, block_n=64, block_k=32)
        return cls(block_m=16, block_n=128, block_k=128)


def _dense_kernel(x_ref, w_ref, b_ref, y_ref, *, activation: str, block_k: int, upcast: bool):
    """x_ref [block_m, K], w_ref [K, block_n], b_ref [1, block_n] -> y_ref [block_m, block_n]."""

    def accumulate(k, acc):
        x = x_ref[:, pl.ds(k * block_k, block_k)]
        w = w_ref[pl.ds(k * block_k, block_k), :]
        return acc + dot_f32(x, w, upcast)

    acc = lax.fori_loop(
        0, x_ref.shape[1] // block_k, accumulate, jnp.zeros(y_ref.shape, jnp.float32)
    )
    y_ref[...] = ACTIVATIONS[activation][0](acc + b_ref[...].astype(jnp.float32)).astype(
        y_ref.dtype
    )


def dense(
    x: Array,
    w: Array,
    b: Array | None = None,
    activation: str = "identity",
    *,
    block_sizes: BlockSizes | None = None,
    interpret: bool | None = None,
) -> Array:
    """y = f(x W + b) in one kernel.

    Args:
      x: [rows, features], float32 or bfloat16.
      w: [features, out], same dtype as x.
      b: [out] or None (no bias).
      activation: "identity", "relu", "tanh" or "sigmoid".
      block_sizes: the tiles (``BlockSizes``); default: ``BlockSizes.get_default`` of the
        backend.
      interpret: True to interpret everywhere; None interprets on CPU only.
    Returns:
      y [rows, out] in x's dtype, accumulated in float32.
    """
    check_activation(activation)
    check_float("x", x)
    if x.ndim != 2 or w.ndim != 2 or x.shape[1] != w.shape[0]:
        raise ValueError(
            f"expected x [rows, features] and w [features, out], got x {x.shape} and w {w.shape}"
        )
    if w.dtype != x.dtype:
        raise TypeError(f"expected w of x's dtype {x.dtype}, got {w.dtype}")
    if b is None:
        b = jnp.zeros((w.shape[1],), x.dtype)
    if b.shape != (w.shape[1],):
        raise ValueError(f"expected b of shape [out]=({w.shape[1]},), got {b.shape}")
    branch = lambda backend: functools.partial(
        _dense,
        activation=activation,
        block_sizes=block_sizes or BlockSizes.get_default(backend),
        backend=backend,
    )
    return on_platforms(branch, interpret, x, w, b.astype(x.dtype))


def matmul_bias_act(x, w, b, activation, block_sizes: BlockSizes, backend: str):
    """The kernel on ``backend`` (see ``common.BACKENDS``): x [rows, K], w [K, out], b [out] ->
    f(x w + b) [rows, out], operands zero-padded to whole blocks inside."""
    rows, features = x.shape
    out = w.shape[1]
    bm, bn, bk = block_sizes.block_m, block_sizes.block_n, block_sizes.block_k
    padded = (round_up(rows, bm), round_up(features, bk), round_up(out, bn))
    xp = pad_to(x, padded[:2])
    wp = pad_to(w, padded[1:])
    bp = pad_to(b, padded[2:]).reshape(1, padded[2])

    interpret = backend == "interpret"
    return pl.pallas_call(
        functools.partial(_dense_kernel, activation=activation, block_k=bk, upcast=interpret),
        grid=(padded[0] // bm, padded[2] // bn),
        in_specs=[
            pl.BlockSpec((bm, padded[1]), lambda i, j: (i, 0)),
            pl.BlockSpec((padded[1], bn), lambda i, j: (0, j)),
            pl.BlockSpec((1, bn), lambda i, j: (0, j)),
        ],
        out_specs=pl.BlockSpec((bm, bn), lambda i, j: (i, j)),
        out_shape=jax.ShapeDtypeStruct((padded[0], padded[2]), x.dtype),
        interpret=interpret,
        compiler_params=compiler_params(backend),
    )(xp, wp, bp)[:rows, :out]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _dense(x, w, b, activation, block_sizes, backend):
    return matmul_bias_act(x, w, b, activation, block_sizes, backend)


def _dense_fwd(x, w, b, activation, block_sizes, backend):
    y = matmul_bias_act(x, w, b, activation, block_sizes, backend)
    return y, (x, w, y)


def _dense_bwd(activation, block_sizes, backend, saved, dy):
    x, w, y = saved
    dpre = (dy.astype(jnp.float32) * ACTIVATIONS[activation][1](y.astype(jnp.float32))).astype(
        x.dtype
    )
    dx = matmul_bias_act(
        dpre, w.T, jnp.zeros((w.shape[0],), x.dtype), "identity", block_sizes, backend
    )
    dw = matmul_bias_act(
        x.T, dpre, jnp.zeros((w.shape[1],), x.dtype), "identity", block_sizes, backend
    )
    db = jnp.sum(dpre.astype(jnp.float32), axis=0).astype(x.dtype)
    return dx, dw, db


_dense.defvjp(_dense_fwd, _dense_bwd)


def dense_reference(
    x: Array, w: Array, b: Array | None = None, activation: str = "identity"
) -> Array:
    """The specification in plain jnp: f(x W + b) accumulated in float32, returned in x's dtype."""
    check_activation(activation)
    pre = dot_f32(x, w, upcast=True)
    if b is not None:
        pre = pre + b.astype(jnp.float32)[None, :]
    return ACTIVATIONS[activation][0](pre).astype(x.dtype)
