"""What every kernel shares: the check of block sizes, activations, and the per-platform choice of
how to run.

A kernel runs interpreted on CPU (``interpret=True``, for tests; never timed) and compiled on GPU
(Triton) and TPU (Mosaic). The choice is made per *lowering* platform with
``lax.platform_dependent``, so one jitted function runs here and still lowers for "cuda" and "tpu".
How much a kernel may keep on chip depends on the device compiled for: ``gpu_shared_memory`` and
``tpu_vmem`` read it from the trace's target device.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as pl_triton

Array = jax.Array


def check_block_sizes(block_sizes, whole: tuple[str, ...] = ()) -> None:
    """Check that every field of a kernel's ``BlockSizes`` is a positive power of two (Triton's
    block shapes must be; Mosaic's tiles are (8, 128)); the fields named in ``whole`` may also be
    None, which the kernel reads as the whole axis."""
    for field in dataclasses.fields(block_sizes):
        value = getattr(block_sizes, field.name)
        if value is None and field.name in whole:
            continue
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
    """σ(x) = 0.5·tanh(x/2) + 0.5: one tanh, no exp or division (the cells' σ too)."""
    return 0.5 * jnp.tanh(0.5 * x) + 0.5


def lstm_gate_gradients(dh: Array, dc_next: Array, acts, c_in: Array, tc: Array | None = None):
    """The LSTM step's backward from its saved activations, all [batch, hidden]: dh and dc_next the
    gradients reaching h_t and C_t, acts the activated gates (i, f, g, o), c_in = C_{t-1}, and
    tc = tanh(C_t) where saved (recomputed from the gates when None).
    Returns ([δpre_i, δpre_f, δpre_g, δpre_o], δC_{t-1}) with, for tc = tanh(C_t),
    δC = dc_next + dh·o·(1 - tc²), δpre_i = δC·g·i(1-i), δpre_f = δC·C_{t-1}·f(1-f),
    δpre_g = δC·i·(1-g²), δpre_o = dh·tc·o(1-o), δC_{t-1} = δC·f."""
    i, f, g, o = acts
    if tc is None:
        tc = jnp.tanh(f * c_in + i * g)
    dc = dc_next + dh * o * (1 - tc * tc)
    return [
        dc * g * i * (1 - i),
        dc * c_in * f * (1 - f),
        dc * i * (1 - g * g),
        dh * tc * o * (1 - o),
    ], dc * f


ACTIVATIONS: dict[str, tuple[Callable[[Array], Array], Callable[[Array], Array]]] = {
    # name: (f, f' written in terms of y = f(x), so a backward pass needs only the output)
    "identity": (lambda x: x, lambda y: jnp.ones_like(y)),
    "relu": (lambda x: jnp.maximum(x, 0), lambda y: (y > 0).astype(y.dtype)),
    "tanh": (jnp.tanh, lambda y: 1 - y * y),
    "sigmoid": (sigmoid, lambda y: y * (1 - y)),
}


def check_activation(name: str) -> None:
    """Raise ``ValueError`` unless ``name`` is a key of ``ACTIVATIONS`` (the dense kernel's)."""
    if name not in ACTIVATIONS:
        raise ValueError(f"expected activation to be one of {tuple(ACTIVATIONS)}, got {name!r}")


def round_up(n: int, multiple: int) -> int:
    """The smallest multiple of ``multiple`` that is at least ``n`` (both positive ints)."""
    return -(-n // multiple) * multiple


def pad_to(x: Array, shape: tuple[int, ...]) -> Array:
    """Zero-pad x at the end of each axis up to ``shape``."""
    return jnp.pad(x, [(0, s - d) for s, d in zip(shape, x.shape)])


def pad_gates(a: Array, hidden_p: int) -> Array:
    """[..., 4*hidden] -> [..., 4*hidden_p], zero-padding each gate block (i, f, g, o) separately,
    so that gate k of the padded array starts at column k*hidden_p."""
    lead, hidden = a.shape[:-1], a.shape[-1] // 4
    a = a.reshape(*lead, 4, hidden)
    return pad_to(a, (*lead, 4, hidden_p)).reshape(*lead, 4 * hidden_p)


def un_pad_gates(a: Array, hidden: int) -> Array:
    """[..., 4*hidden_p] -> [..., 4*hidden]: the inverse of ``pad_gates``."""
    lead, hidden_p = a.shape[:-1], a.shape[-1] // 4
    return a.reshape(*lead, 4, hidden_p)[..., :hidden].reshape(*lead, 4 * hidden)


def check_float(name: str, x: Array) -> None:
    """Raise ``TypeError`` naming ``name`` unless x's dtype is float32 or bfloat16, the dtypes
    the kernels compute in."""
    if x.dtype not in (jnp.float32, jnp.bfloat16):
        raise TypeError(f"expected {name} of dtype float32 or bfloat16, got {x.dtype}")


def check_lstm_operands(
    x_proj: Array, w_h: Array, carry: tuple[Array, Array], carry_name: str
) -> int:
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
            raise ValueError(
                f"expected {carry_name} {name} [batch, hidden]=({batch}, {hidden}), got {a.shape}"
            )
    return hidden


# How a kernel runs: interpreted (CPU, tests), compiled by Triton (NVIDIA and AMD GPUs) or by Mosaic
# (TPU). Kernels take the backend as a static argument; ``on_platforms`` picks it per lowering platform.
BACKENDS = ("interpret", "triton", "mosaic")


def on_platforms(branch: Callable[[str], Callable], interpret: bool | None, *args):
    """Run ``branch(backend)(*args)`` with the backend of the platform being lowered for.

    ``interpret=True`` interprets everywhere; ``None`` (default) interprets on CPU and compiles
    with Triton on GPU and with Mosaic on TPU, chosen per lowering platform by
    ``lax.platform_dependent``, so that one jitted function runs here and lowers for each.
    """
    if interpret:
        return branch("interpret")(*args)
    triton = branch("triton")
    return jax.lax.platform_dependent(
        *args, cpu=branch("interpret"), cuda=triton, rocm=triton, tpu=branch("mosaic")
    )


def compiler_params(
    backend: str, *, num_warps: int = 4, num_stages: int = 2, vmem_limit_bytes: int | None = None
):
    """The ``pallas_call`` compiler parameters of ``backend`` (None when interpreted)."""
    if backend == "triton":
        return pl_triton.CompilerParams(num_warps=num_warps, num_stages=num_stages)
    if backend == "mosaic":
        return pltpu.CompilerParams(vmem_limit_bytes=vmem_limit_bytes)
    return None


def target_platform() -> str:
    """The backend of the device being compiled for ("triton", "mosaic" or "interpret")."""
    kind = target_device_kind()
    if kind.startswith("TPU"):
        return "mosaic"
    if kind.startswith(("NVIDIA", "AMD", "Tesla")) or kind.startswith("gfx"):
        return "triton"
    return "interpret"


def check_sequence_operands(x_proj, w_h, initial_carry, seq_lengths) -> tuple[int, int, int]:
    """Validate the operands of a whole-sequence kernel; return (time, batch, hidden)."""
    check_float("x_proj", x_proj)
    if x_proj.ndim != 3 or x_proj.shape[-1] % 4:
        raise ValueError(
            f"expected x_proj of rank 3 [time, batch, 4*hidden], got shape {x_proj.shape}"
        )
    time, batch, _ = x_proj.shape
    hidden = check_lstm_operands(x_proj, w_h, initial_carry, "initial carry")
    if seq_lengths is not None and jnp.shape(seq_lengths) != (batch,):
        raise ValueError(
            f"expected seq_lengths of shape [batch]=({batch},), got {jnp.shape(seq_lengths)}"
        )
    return time, batch, hidden


# ---------------------------------------------------------------------------------------------
# On-chip memory of the device being compiled for


def target_device_kind() -> str:
    """``device_kind`` of the device a trace is for: the abstract mesh's device when one is set
    (ahead-of-time compiles, see ``jaxmodels.targets``), else JAX's default device."""
    abstract = jax.sharding.get_abstract_mesh().abstract_device
    return abstract.device_kind if abstract is not None else jax.devices()[0].device_kind


# Shared memory one Triton program may use (cudaDevAttrMaxSharedMemoryPerBlockOptin, bytes), by
# device kind; XLA's target descriptions of these GPUs give the same figures.
GPU_SHARED_MEMORY = {"H100": 232448, "H200": 232448, "GH200": 232448, "A100": 166912, "A30": 166912}
# Any other GPU: the smallest current figure, sm_86/sm_89's (RTX 30/40, L4, A10).
UNKNOWN_GPU_SHARED_MEMORY = 101376
# SMs of a GPU that reports none: the fewest of current data-center parts (L4: 58).
UNKNOWN_GPU_CORES = 58
# Any other target: Mosaic's scoped-VMEM default, which every TPU generation has.
UNKNOWN_TPU_VMEM = 16 * 2**20


def gpu_shared_memory() -> int:
    """Shared memory per Triton program of the GPU being compiled for (bytes); the smallest of
    current NVIDIA GPUs when the trace is not for a GPU known here."""
    kind = target_device_kind()
    for name, size in GPU_SHARED_MEMORY.items():
        if kind.startswith(f"NVIDIA {name}") or kind == name:
            return size
    return UNKNOWN_GPU_SHARED_MEMORY


def gpu_core_count() -> int:
    """Streaming multiprocessors of the GPU being compiled for: the abstract mesh's device when one
    is set (``jaxmodels.targets``: the target description's figure, 132 on an H100 SXM, 108 on an
    A100), else the attached device's ``core_count``; ``UNKNOWN_GPU_CORES`` when neither says."""
    abstract = jax.sharding.get_abstract_mesh().abstract_device
    cores = abstract.num_cores if abstract is not None else None
    if cores is None:
        cores = getattr(jax.devices()[0], "core_count", None)
    return int(cores) if cores else UNKNOWN_GPU_CORES


def tpu_vmem() -> int:
    """VMEM per TensorCore of the TPU being compiled for (bytes), from JAX's table of TPU
    generations (v5e and v6e: 128 MiB, v5p and v7: 64 MiB); the scoped default of 16 MiB when the
    trace is not for a TPU."""
    try:
        return pltpu.get_tpu_info().vmem_capacity_bytes
    except (ValueError, RuntimeError):
        return UNKNOWN_TPU_VMEM


def lstm_recurrence_reference(
    x_proj: Array,
    w_h: Array,
    initial_carry: tuple[Array, Array],
    seq_lengths: Array | None = None,
    *,
    reverse: bool = False,
    h_dtype,
) -> tuple[tuple[Array, Array], Array]:
    """The recurrent kernels' specification in plain jnp: a ``lax.scan`` of the seed's LSTM step
    over x_proj [time, batch, 4*hidden] (x_t W_x + b, gates i, f, g, o) from initial_carry
    (h_0, c_0), each [batch, hidden]::

        pre = x_t + h_{t-1} w_h                      (the gate math in float32)
        C_t = σ(pre_f) ⊙ C_{t-1} + σ(pre_i) ⊙ tanh(pre_g)        h_t = σ(pre_o) ⊙ tanh(C_t)

    C carried in float32 and h in ``h_dtype`` between steps, as the kernel it specifies carries
    them. At t >= seq_lengths[b] row b keeps its carry and outputs zeros. Returns ((h_T, C_T),
    hs [time, batch, hidden]), all in x_proj's dtype.
    """
    time, batch, gates = x_proj.shape
    hidden = gates // 4
    lengths = jnp.full((batch,), time, jnp.int32) if seq_lengths is None else seq_lengths

    def step(carry, inputs):
        h, c = carry
        x_t, t = inputs
        pre = x_t.astype(jnp.float32) + dot_f32(h.astype(w_h.dtype), w_h, upcast=True)
        i, f, g, o = (pre[:, k * hidden : (k + 1) * hidden] for k in range(4))
        new_c = sigmoid(f) * c + sigmoid(i) * jnp.tanh(g)
        new_h = (sigmoid(o) * jnp.tanh(new_c)).astype(h_dtype)
        keep = (t < lengths)[:, None]
        out = jnp.where(keep, new_h, 0).astype(x_proj.dtype)
        return (jnp.where(keep, new_h, h), jnp.where(keep, new_c, c)), out

    carry = (initial_carry[0].astype(h_dtype), initial_carry[1].astype(jnp.float32))
    (h, c), hs = lax.scan(step, carry, (x_proj, jnp.arange(time)), reverse=reverse)
    return (h.astype(x_proj.dtype), c.astype(x_proj.dtype)), hs
