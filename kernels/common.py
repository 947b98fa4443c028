"""What every kernel shares: block sizes, activations, and the per-platform choice of how to run.

A kernel runs interpreted on CPU (``interpret=True``, for tests; never timed) and compiled on GPU
(Triton) and TPU (Mosaic). The choice is made per *lowering* platform with
``lax.platform_dependent``, so one jitted function runs here and still lowers for "cuda" and "tpu".
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp
from jax.experimental.pallas import triton as pl_triton

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile sizes of a kernel, each a power of two (Triton's requirement; TPU tiles are (8, 128)).

    block_rows: rows of the output per program (batch for the LSTM kernels, M for dense).
    block_cols: output columns per program (hidden for the LSTM kernels, N for dense).
    block_reduce: width of each slice of the reduction axis (K) in a matmul loop.
    block_time: time steps per grid step of ``lstm_sequence`` (TPU and interpreter).
    """

    block_rows: int = 16
    block_cols: int = 128
    block_reduce: int = 128
    block_time: int = 16

    def __post_init__(self):
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if not isinstance(value, int) or value < 1 or value & (value - 1):
                raise ValueError(f"expected {field.name} to be a positive power of two, got {value!r}")


def dot_f32(a: Array, b: Array, upcast: bool) -> Array:
    """a b accumulated in float32. With ``upcast`` the operands are cast to float32 first, which is
    exact for bfloat16 (a product of two bfloat16 numbers is exact in float32); kernels upcast when
    interpreted on CPU, whose XLA runtime lacks a bf16 x bf16 -> f32 dot for some shapes, and keep
    bfloat16 operands for the tensor cores and MXU when compiled."""
    if upcast:
        a, b = a.astype(jnp.float32), b.astype(jnp.float32)
    return jnp.dot(a, b, preferred_element_type=jnp.float32)


def sigmoid(x: Array) -> Array:
    """σ(x) = 0.5·tanh(x/2) + 0.5: one tanh, no exp or division (as jaxmodels.cells.sigmoid)."""
    return 0.5 * jnp.tanh(0.5 * x) + 0.5


ACTIVATIONS: dict[str, tuple[Callable[[Array], Array], Callable[[Array], Array]]] = {
    # name: (f, f' written in terms of y = f(x), so a backward pass needs only the output)
    "identity": (lambda x: x, lambda y: jnp.ones_like(y)),
    "relu": (lambda x: jnp.maximum(x, 0), lambda y: (y > 0).astype(y.dtype)),
    "tanh": (jnp.tanh, lambda y: 1 - y * y),
    "sigmoid": (sigmoid, lambda y: y * (1 - y)),
}


def check_activation(name: str) -> None:
    if name not in ACTIVATIONS:
        raise ValueError(f"expected activation to be one of {tuple(ACTIVATIONS)}, got {name!r}")


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def pad_to(x: Array, shape: tuple[int, ...]) -> Array:
    """Zero-pad x at the end of each axis up to ``shape``."""
    return jnp.pad(x, [(0, s - d) for s, d in zip(shape, x.shape)])


def check_float(name: str, x: Array) -> None:
    if x.dtype not in (jnp.float32, jnp.bfloat16):
        raise TypeError(f"expected {name} of dtype float32 or bfloat16, got {x.dtype}")


def check_lstm_operands(x_proj: Array, w_h: Array, carry: tuple[Array, Array], carry_name: str) -> int:
    """Validate x_proj [..., batch, 4*hidden], w_h [hidden, 4*hidden] of x_proj's dtype and the
    carry (h, c), each [batch, hidden]; return hidden."""
    batch, gates = x_proj.shape[-2:]
    hidden = gates // 4
    if w_h.shape != (hidden, gates) or w_h.dtype != x_proj.dtype:
        raise ValueError(
            f"expected w_h [hidden, 4*hidden]=({hidden}, {gates}) of dtype {x_proj.dtype}, got {w_h.shape} {w_h.dtype}"
        )
    for name, a in zip("hc", carry):
        if a.shape != (batch, hidden):
            raise ValueError(f"expected {carry_name} {name} [batch, hidden]=({batch}, {hidden}), got {a.shape}")
    return hidden


def run_on_platform(call: Callable[..., Array], interpret: bool | None, *args: Array):
    """Run ``call(*args, interpret=..., compiler_params=...)`` as the platform requires.

    ``interpret=True`` interprets everywhere; ``None`` (default) interprets on CPU and compiles
    with Triton on GPU and with Mosaic on TPU, chosen per lowering platform.
    """
    if interpret:
        return call(*args, interpret=True, compiler_params=None)
    return jax.lax.platform_dependent(
        *args,
        cpu=functools.partial(call, interpret=True, compiler_params=None),
        cuda=functools.partial(call, interpret=False, compiler_params=pl_triton.CompilerParams(num_warps=4, num_stages=2)),
        rocm=functools.partial(call, interpret=False, compiler_params=pl_triton.CompilerParams(num_warps=4, num_stages=2)),
        tpu=functools.partial(call, interpret=False, compiler_params=None),
    )
