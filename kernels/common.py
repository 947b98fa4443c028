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


@dataclasses.dataclass(frozen=True)
class Cell:
    """The pointwise step of the recurrent kernels (``lstm_sequence``, ``lstm_grid``), after the
    matmul: which cell the recurrence runs over its ``gates`` pre-activation blocks pre_k =
    x_t,k + h_{t-1} w_h,k [rows, hidden] (float32).

    ``activation`` None: the LSTM, gates (i, f, g, o) and a cell state C carried beside h::

        C_t = σ(pre_f) ⊙ C_{t-1} + σ(pre_i) ⊙ tanh(pre_g)    h_t = σ(pre_o) ⊙ tanh(C_t)

    ``activation`` a name in ``ACTIVATIONS``: the simple RNN, one block and no C,
    h_t = f(pre). ``LSTM`` and ``rnn_cell(name)`` make them.
    """

    activation: str | None = None

    def __post_init__(self):
        if self.activation is not None:
            check_activation(self.activation)

    @property
    def gates(self) -> int:
        """Blocks of w_h's columns: 4 (i, f, g, o) for the LSTM, 1 for the simple RNN."""
        return 4 if self.activation is None else 1

    @property
    def name(self) -> str:
        """The kernels' name prefix (``pallas_call``'s ``name``): "lstm" or "rnn"."""
        return "lstm" if self.activation is None else "rnn"

    @property
    def has_c(self) -> bool:
        """Whether the carry is (h, C) (the LSTM) rather than (h,)."""
        return self.activation is None

    def forward(self, pre: list[Array], c: Array | None):
        """pre: the ``gates`` blocks [rows, hidden], float32; c: C_{t-1} (None for the RNN).
        Returns (h_t, C_t or None, acts): acts, the activated blocks, are what ``backward`` needs
        (the LSTM's i, f, g, o; the RNN's h_t itself), in float32."""
        if self.activation is None:
            i, f, g, o = sigmoid(pre[0]), sigmoid(pre[1]), jnp.tanh(pre[2]), sigmoid(pre[3])
            new_c = f * c + i * g
            return o * jnp.tanh(new_c), new_c, [i, f, g, o]
        h = ACTIVATIONS[self.activation][0](pre[0])
        return h, None, [h]

    def backward(self, dh: Array, dc_next: Array | None, acts: list[Array], c_in: Array | None):
        """The step's backward from ``forward``'s acts: dh and dc_next the gradients reaching h_t
        and C_t (None for the RNN), c_in = C_{t-1}. Returns (δpre blocks, δC_{t-1} or None): the
        LSTM's ``lstm_gate_gradients``; the RNN's δpre = dh ⊙ f'(h_t), f' from ``ACTIVATIONS``."""
        if self.activation is None:
            return lstm_gate_gradients(dh, dc_next, acts, c_in)
        return [dh * ACTIVATIONS[self.activation][1](acts[0])], None


LSTM = Cell()


def rnn_cell(activation: str) -> Cell:
    """The simple RNN's ``Cell`` with ``activation``, a name in ``ACTIVATIONS``."""
    return Cell(activation)


def with_absent(kernel: Callable, present: tuple[bool, ...], *refs) -> None:
    """``kernel`` called with its whole list of refs, None in place of each one that is absent
    (``present`` False): a kernel body written once for every cell, whose ``pallas_call`` passes
    only the refs there are (no C refs for the RNN, no residual refs for a forward saving none)."""
    given = iter(refs)
    kernel(*(next(given) if p else None for p in present))


def kept(keep: Array, new: Array | None, old: Array | None) -> Array | None:
    """jnp.where(keep, new, old), or None for a state the cell does not have (C of the RNN)."""
    return None if old is None else jnp.where(keep, new, old)


def round_up(n: int, multiple: int) -> int:
    """The smallest multiple of ``multiple`` that is at least ``n`` (both positive ints)."""
    return -(-n // multiple) * multiple


def pad_to(x: Array, shape: tuple[int, ...]) -> Array:
    """Zero-pad x at the end of each axis up to ``shape``."""
    return jnp.pad(x, [(0, s - d) for s, d in zip(shape, x.shape)])


def pad_gates(a: Array, hidden_p: int, gates: int = 4) -> Array:
    """[..., gates*hidden] -> [..., gates*hidden_p], zero-padding each gate block (the LSTM's i,
    f, g, o; the simple RNN's one) separately, so that gate k of the padded array starts at column
    k*hidden_p."""
    lead, hidden = a.shape[:-1], a.shape[-1] // gates
    a = a.reshape(*lead, gates, hidden)
    return pad_to(a, (*lead, gates, hidden_p)).reshape(*lead, gates * hidden_p)


def un_pad_gates(a: Array, hidden: int, gates: int = 4) -> Array:
    """[..., gates*hidden_p] -> [..., gates*hidden]: the inverse of ``pad_gates``."""
    lead, hidden_p = a.shape[:-1], a.shape[-1] // gates
    return a.reshape(*lead, gates, hidden_p)[..., :hidden].reshape(*lead, gates * hidden)


def check_float(name: str, x: Array) -> None:
    """Raise ``TypeError`` naming ``name`` unless x's dtype is float32 or bfloat16, the dtypes
    the kernels compute in."""
    if x.dtype not in (jnp.float32, jnp.bfloat16):
        raise TypeError(f"expected {name} of dtype float32 or bfloat16, got {x.dtype}")


def check_lstm_operands(
    x_proj: Array, w_h: Array, carry: tuple[Array, ...], carry_name: str, gates: int = 4
) -> int:
    """Validate x_proj [..., batch, gates*hidden], w_h [hidden, gates*hidden] of x_proj's dtype
    and the carry, each [batch, hidden]: (h, c) for the LSTM (``gates`` 4), (h,) for the simple
    RNN (``gates`` 1); return hidden."""
    batch, width = x_proj.shape[-2:]
    hidden = width // gates
    if w_h.shape != (hidden, width) or w_h.dtype != x_proj.dtype:
        raise ValueError(
            f"expected w_h [hidden, {gates}*hidden]=({hidden}, {width}) of dtype {x_proj.dtype}, "
            f"got {w_h.shape} {w_h.dtype}"
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


def check_sequence_operands(
    x_proj, w_h, initial_carry, seq_lengths, gates: int = 4
) -> tuple[int, int, int]:
    """Validate the operands of a whole-sequence kernel (``gates`` 4: the LSTM's, initial_carry
    (h_0, c_0); 1: the simple RNN's, initial_carry (h_0,)); return (time, batch, hidden)."""
    check_float("x_proj", x_proj)
    if x_proj.ndim != 3 or x_proj.shape[-1] % gates:
        raise ValueError(
            f"expected x_proj of rank 3 [time, batch, {gates}*hidden], got shape {x_proj.shape}"
        )
    time, batch, _ = x_proj.shape
    hidden = check_lstm_operands(x_proj, w_h, initial_carry, "initial carry", gates)
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


def recurrence_reference(
    x_proj: Array,
    w_h: Array,
    initial_carry: tuple[Array, ...],
    seq_lengths: Array | None = None,
    *,
    reverse: bool = False,
    h_dtype,
    cell: Cell = LSTM,
) -> tuple[tuple[Array, ...], Array]:
    """The recurrent kernels' specification in plain jnp: a ``lax.scan`` of ``cell``'s step over
    x_proj [time, batch, G*hidden] (x_t W_x + b; G = cell.gates: the LSTM's i, f, g, o, the
    RNN's one block) from initial_carry, (h_0, C_0) for the LSTM and (h_0,) for the RNN, each
    [batch, hidden]::

        pre = x_t + h_{t-1} w_h                      (the cell's math in float32)
        LSTM: C_t = σ(pre_f) ⊙ C_{t-1} + σ(pre_i) ⊙ tanh(pre_g)     h_t = σ(pre_o) ⊙ tanh(C_t)
        RNN:  h_t = f(pre)

    C carried in float32 and h in ``h_dtype`` between steps, as the kernel it specifies carries
    them. At t >= seq_lengths[b] row b keeps its carry and outputs zeros. Returns (carry at T,
    hs [time, batch, hidden]), all in x_proj's dtype.
    """
    time, batch, width = x_proj.shape
    hidden = width // cell.gates
    lengths = jnp.full((batch,), time, jnp.int32) if seq_lengths is None else seq_lengths

    def step(carry, inputs):
        h, c = carry
        x_t, t = inputs
        pre = x_t.astype(jnp.float32) + dot_f32(h.astype(w_h.dtype), w_h, upcast=True)
        new_h, new_c, _ = cell.forward(
            [pre[:, k * hidden : (k + 1) * hidden] for k in range(cell.gates)], c
        )
        new_h = new_h.astype(h_dtype)
        keep = (t < lengths)[:, None]
        out = jnp.where(keep, new_h, 0).astype(x_proj.dtype)
        return (jnp.where(keep, new_h, h), kept(keep, new_c, c)), out

    c0 = initial_carry[1].astype(jnp.float32) if cell.has_c else None
    carry = (initial_carry[0].astype(h_dtype), c0)
    (h, c), hs = lax.scan(step, carry, (x_proj, jnp.arange(time)), reverse=reverse)
    final = (h, c) if cell.has_c else (h,)
    return tuple(a.astype(x_proj.dtype) for a in final), hs
