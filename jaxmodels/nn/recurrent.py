"""Fused LSTM and simple-RNN recurrences over whole sequences.

Batch-major at the API (``xs`` [batch, time, features], ``hs`` [batch, time, hidden]). The loops
read xs and the gradient of hs a time step or a chunk of steps at a time and write the gradient
of xs in place, a chunk at a time; hs and the per-step residuals are stacked time-major, hs then
transposed once. Each step does the fused gate pre-activations x_t W_x + b + h_{t-1} W_h
as [batch, G*hidden] (G = 4 for the LSTM, gates i, f, g, o) with the gate math fused around them.

The backward pass is a ``custom_vjp``: a reverse-time loop over the gate gradients δpre_t with
δh_{t-1} = δpre_t W_hᵀ, saving per step only what the cell's backward needs (the LSTM: its
activated gates and tanh(C_t), with the C_{t-1} entering the step; h_{t-1} comes back from the
outputs). The weight and input gradients are matmuls over chunks of steps (δW_h = Σ_t h_{t-1}ᵀ
δpre_t as [hidden, chunk*batch] x [chunk*batch, G*hidden]): the whole sequence at once on GPU/TPU,
a few steps at a time on CPU, where they stay in cache (see ``_recurrence``).

Variable lengths follow PyTorch's packed sequences: a step at t >= seq_lengths[b] leaves
sequence b's carry unchanged and outputs zeros, so the final carry is each sequence's state at its
last real step; with ``reverse=True`` each sequence is read from its own last real step backwards.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from jaxmodels.kernels import lstm_sequence, lstm_stepwise
from jaxmodels.kernels.common import lstm_gate_gradients, on_platforms
from jaxmodels.nn import cells, checks

Array = jax.Array

IMPLS = ("auto", "scan", "pallas")
KERNEL_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))


# ---------------------------------------------------------------------------------------------
# Public functions


def lstm_scan(
    params: dict,
    xs: Array,
    initial_carry: tuple[Array, Array] | None = None,
    *,
    seq_lengths: Array | None = None,
    reverse: bool = False,
    unroll: int = 1,
    impl: str = "auto",
) -> tuple[tuple[Array, Array], Array]:
    """Run ``cells.lstm_cell`` over a whole sequence.

    Args:
      params: {"w_x": [features, 4*hidden], "w_h": [hidden, 4*hidden], "b": [4*hidden]}, gates i, f, g, o.
      xs: [batch, time, features], floating point, batch and time >= 1 (a nested list is
        converted). Computed in the promoted dtype of xs and params (``checks.promote_types``:
        bfloat16 xs with float32 params run in float32, as the modules with ``dtype=None``).
      initial_carry: (h_0, c_0), each [batch, hidden], cast to that dtype; zeros when None.
      seq_lengths: [batch] integers in [0, time], or None for full length. Out-of-range values
        raise when concrete; traced (under ``jax.jit``) they act as clamped to [0, time], and raise
        only under ``jaxmodels.checked`` (see ``checks``).
      reverse: run from the last time step to the first (outputs stay in input time order).
      unroll: time steps per loop iteration (an integer >= 1), passed to ``lax.scan`` (the kernel
        ignores it).
      impl: "scan" (``lax.scan``); "pallas": the Pallas kernels, interpreted on CPU and compiled on
        GPU and TPU: the persistent ``kernels.lstm_sequence`` where w_h fits on chip of the device
        compiled for (``lstm_sequence.plan``), else ``kernels.lstm_stepwise`` (one kernel a step);
        "auto": the persistent kernel where it fits and xs and params are all float32 or all
        bfloat16, the scan otherwise (on CPU always the scan).
    Returns:
      ((h_T, c_T), hs) with h_T, c_T [batch, hidden] and hs [batch, time, hidden].
    Raises:
      ValueError / TypeError naming the expected value, for any of the above not met (shapes,
      dtypes, impl, unroll, and seq_lengths' values when concrete).
    """
    _check_impl(impl)
    xs = checks.sequences(xs)
    hidden = _check_params(params, xs, blocks=4, cell="LSTM")
    unroll = checks.size("unroll", unroll)
    batch, time, _ = xs.shape
    param_dtypes = {jnp.result_type(p) for p in params.values()}
    kernel_dtypes = xs.dtype in KERNEL_DTYPES and param_dtypes == {xs.dtype}
    if impl == "pallas" and not kernel_dtypes:
        raise TypeError(
            f"expected xs and params of one dtype, float32 or bfloat16, for impl='pallas', got xs "
            f"{xs.dtype} and params {sorted(map(str, param_dtypes))}"
        )
    xs, params = _promoted(xs, params)
    if initial_carry is None:
        zeros = jnp.zeros((batch, hidden), xs.dtype)
        initial_carry = (zeros, zeros)
    elif not (isinstance(initial_carry, (tuple, list)) and len(initial_carry) == 2):
        raise ValueError("expected initial_carry to be a pair (h, c), each [batch, hidden]")
    initial_carry = tuple(
        _check_carry(c, batch, hidden, name, xs.dtype) for c, name in zip(initial_carry, "hc")
    )
    mask = _time_mask(seq_lengths, batch, time)
    xs = _zero_padding(xs, mask)
    args = (params["w_x"], params["b"], params["w_h"], initial_carry, xs)

    def scan(w_x, b, w_h, carry, xs):
        return _recurrence(_LSTM, w_x, b, w_h, carry, xs, mask, reverse, unroll)

    def kernel(recurrence):
        def run(w_x, b, w_h, carry, xs):
            x_proj = cells.add_bias(jnp.einsum("btf,fg->tbg", xs, w_x), b)
            carry, hs = recurrence(x_proj, w_h, *carry, lengths)
            return carry, jnp.swapaxes(hs, 0, 1)

        return run

    lengths = (
        jnp.full((batch,), time, jnp.int32)
        if seq_lengths is None
        else jnp.asarray(seq_lengths, jnp.int32)
    )
    persistent = lambda backend: lstm_sequence.sequence_kernel(backend, hidden, xs.dtype, reverse)

    def pallas(backend):  # the persistent kernel where w_h fits on chip, else one kernel per step
        return kernel(persistent(backend) or lstm_stepwise.stepwise_kernel(backend, reverse))

    def auto(backend):  # the persistent kernel where w_h fits on chip, else the scan
        recurrence = persistent(backend) if backend != "interpret" else None
        return kernel(recurrence) if recurrence is not None else scan

    if impl == "scan" or (impl == "auto" and not kernel_dtypes):
        carry, hs = scan(*args)
    else:
        carry, hs = on_platforms(pallas if impl == "pallas" else auto, None, *args)
    return tuple(carry), hs


def rnn_scan(
    params: dict,
    xs: Array,
    initial_carry: Array | None = None,
    *,
    seq_lengths: Array | None = None,
    reverse: bool = False,
    unroll: int = 1,
    impl: str = "auto",
    activation: Callable[[Array], Array] | str = jnp.tanh,
) -> tuple[Array, Array]:
    """Run ``cells.rnn_cell`` over a whole sequence: h_t = f(x_t W + h_{t-1} U + b).

    Args:
      params: {"w_x": [features, hidden], "w_h": [hidden, hidden], "b": [hidden]}.
      xs: as for ``lstm_scan`` (computed in the promoted dtype of xs and params).
      initial_carry: h_0 [batch, hidden], cast to that dtype; zeros when None.
      seq_lengths, reverse, unroll: as for ``lstm_scan``.
      impl: "auto" or "scan" (the Pallas kernels are LSTM-only).
      activation: f, elementwise (tanh by default): a callable, or a name in
        ``kernels.common.ACTIVATIONS`` ('identity', 'relu', 'tanh', 'sigmoid').
    Returns:
      (h_T, hs) with h_T [batch, hidden] and hs [batch, time, hidden].
    Raises:
      ValueError / TypeError as ``lstm_scan``, and for an unknown activation.
    """
    _check_impl(impl, ("auto", "scan"))
    xs = checks.sequences(xs)
    hidden = _check_params(params, xs, blocks=1, cell="RNN")
    unroll = checks.size("unroll", unroll)
    activation = checks.activation(activation)
    batch, time, _ = xs.shape
    xs, params = _promoted(xs, params)
    if initial_carry is None:
        initial_carry = jnp.zeros((batch, hidden), xs.dtype)
    initial_carry = _check_carry(initial_carry, batch, hidden, "h", xs.dtype)
    mask = _time_mask(seq_lengths, batch, time)
    xs = _zero_padding(xs, mask)
    (h,), hs = _recurrence(
        _rnn(activation),
        params["w_x"],
        params["b"],
        params["w_h"],
        (initial_carry,),
        xs,
        mask,
        reverse,
        unroll,
    )
    return h, hs


# ---------------------------------------------------------------------------------------------
# Cells as seen by the recurrence: carry (h, *rest); forward from fused pre-activations, and the
# matching backward step


class _Cell(NamedTuple):
    """forward(pre [batch, G*hidden], carry) -> (new carry, saved): the step after the matmuls,
    ``saved`` being what backward needs. backward(dh, drest, saved, rest_in) -> (dpre, drest_in):
    dh the gradient reaching h_t, drest the gradients of the rest of the carry after the step,
    rest_in the rest of the carry before it."""

    forward: Callable
    backward: Callable


def _lstm_forward_step(pre, carry):
    h, c, gates, tanh_c = cells.lstm_update(pre, carry[1])
    return (h, c), jnp.concatenate([*gates, tanh_c], axis=-1)


def _lstm_backward_step(dh, drest, saved, rest_in):
    """saved: [batch, 5*hidden], the activated gates i, f, g, o and tanh(C_t) (saved rather than
    recomputed: 4% of the training step at hidden 256 on CPU)."""
    (dc_next,), (c_in,) = drest, rest_in
    i, f, g, o, tc = jnp.split(saved, 5, axis=-1)
    dpre, dc_prev = lstm_gate_gradients(dh, dc_next, (i, f, g, o), c_in, tc)
    return jnp.concatenate(dpre, axis=-1), (dc_prev,)


_LSTM = _Cell(_lstm_forward_step, _lstm_backward_step)


@functools.cache
def _rnn(activation: Callable[[Array], Array]) -> _Cell:
    def forward(pre, carry):
        return (activation(pre),), pre

    def backward(dh, drest, pre, rest_in):
        return jax.vjp(activation, pre)[1](dh)[0], ()

    return _Cell(forward, backward)


# ---------------------------------------------------------------------------------------------
# The recurrence, with a hand-written backward pass


CPU_BACKWARD_ROWS = (
    800  # backward chunks on CPU: at most this many rows (steps x batch); see _recurrence
)


def _recurrence(cell, w_x, b, w_h, carry, xs, mask, reverse, unroll):
    """Run ``cell`` over xs [batch, time, features] from carry (h, *rest), each [batch, hidden];
    mask [time, batch] or None. Returns (final carry, hs [batch, time, hidden]).

    Time is cut into chunks of equal length, one length for the forward pass and one for the
    backward. Per forward chunk, the input projection of its steps is one matmul before its loop;
    per backward chunk, the weight and input gradients are matmuls over its steps after its loop.
    Only h_{t-1} W_h (forward) and δpre_t W_hᵀ (backward) remain per step. The lengths are chosen
    per lowering platform: the whole sequence on GPU/TPU (one large matmul each); on CPU, one step
    forward (the whole sequence for batch 1) and backward the longest chunk (a divisor of time) of
    at most ``CPU_BACKWARD_ROWS`` // batch steps, so that its matmuls have up to 800 rows.
    Measured there (hidden 256, batch 64, time 150): a whole-sequence [time*batch, 4*hidden]
    projection goes to memory and back and made the forward 2x slower; forward chunks of 5 to 30
    steps were 20% slower than one step, where x_t W_x runs on one core beside h_{t-1} W_h on the
    other; backward chunks of 10 steps made the training step 10% faster than per-step
    weight-gradient matmuls and their sums, and chunks of 15-30 steps were slower. At smaller
    batches longer chunks pay: 800 rows instead of at most 12 steps made the LSTM's training step
    1.4x faster at (256, 1, 150), 1.2x at (512, 16, 25) and (128, 16, 100), 1.04x at (256, 16,
    150), the simple RNN's 1.3x at (256, 16, 150). At batch 1 each step's x_t W_x is a matrix-vector
    product that reads all of W_x: one projection for the whole sequence made the forward 1.6x
    faster at (256, 1, 150); at batch 4 and more one step was best. Symbolic sizes (an export with
    any batch or time) take one step at a time, forward and backward, on every platform.

    Measured there too: reading xs and writing its gradient a step or a chunk at a time, rather
    than transposing them whole, made the training step 3% faster; hs is stacked time-major and
    transposed once (writing it batch-major step by step made the forward 7% slower).
    """
    batch, time, _ = xs.shape
    args = (w_x, b, w_h, carry, xs, mask)

    def run(chunks):  # chunks: (forward chunk length, backward chunk length), each dividing time
        return lambda *args: _recurrence_core(cell, *args, reverse, unroll, chunks)

    if not isinstance(batch, int) or not isinstance(time, int):  # symbolic sizes (jax.export)
        return run((1, 1))(*args)

    cpu_forward_chunk = time if batch == 1 else 1
    cpu_backward_chunk = chunk_length(time, max(1, CPU_BACKWARD_ROWS // batch))
    return lax.platform_dependent(
        *args, cpu=run((cpu_forward_chunk, cpu_backward_chunk)), default=run((time, time))
    )


def chunk_length(time: int, most: int) -> int:
    """The largest divisor of ``time`` that is at most ``most`` (1 for a prime time > most)."""
    return max(k for k in range(1, min(time, most) + 1) if time % k == 0) if time else 1


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 7, 8, 9))
def _recurrence_core(cell, w_x, b, w_h, carry, xs, mask, reverse, unroll, chunks):
    carry, hs, _ = _forward(cell, w_x, b, w_h, carry, xs, mask, reverse, unroll, chunks[0])
    return carry, jnp.swapaxes(hs, 0, 1)


def _in_chunks(a: Array | None, chunk: int) -> Array | None:
    """[time, ...] -> [time // chunk, chunk, ...]."""
    return None if a is None else a.reshape(a.shape[0] // chunk, chunk, *a.shape[1:])


def _chunk_starts(time: int, chunk: int) -> Array:
    return jnp.arange(0, time, chunk)


def _forward(cell, w_x, b, w_h, carry, xs, mask, reverse, unroll, chunk):
    """The loop. Returns (final carry, hs [time, batch, hidden], residuals): the cell's ``saved``
    and the rest of the carry entering each step, each [time, batch, ...]."""
    time = xs.shape[1]
    bias = b.reshape(1, -1)

    def step(carry, inputs):
        t, pre_x, m_t = inputs
        if pre_x is None:  # per-step projection
            pre_x = lax.dynamic_index_in_dim(xs, t, axis=1, keepdims=False) @ w_x + bias
        new, saved = cell.forward(pre_x + carry[0] @ w_h, carry)
        h_out = new[0]
        if m_t is not None:
            keep = m_t[:, None]
            new = tuple(jnp.where(keep, n, c) for n, c in zip(new, carry))
            h_out = jnp.where(keep, new[0], 0)
        return new, (h_out, saved, carry[1:])

    def run_chunk(carry, inputs):
        start, m_c = inputs  # m_c: [chunk, batch]
        x_c = lax.dynamic_slice_in_dim(xs, start, chunk, axis=1)
        pre_x = cells.add_bias(jnp.einsum("btf,fg->tbg", x_c, w_x), b)
        return lax.scan(
            step, carry, (start + jnp.arange(chunk), pre_x, m_c), reverse=reverse, unroll=unroll
        )

    if chunk == 1:
        carry, per_step = lax.scan(
            step, tuple(carry), (jnp.arange(time), None, mask), reverse=reverse, unroll=unroll
        )
    else:
        chunks = (_chunk_starts(time, chunk), _in_chunks(mask, chunk))
        carry, per_step = lax.scan(run_chunk, tuple(carry), chunks, reverse=reverse)
        per_step = jax.tree.map(lambda a: a.reshape(time, *a.shape[2:]), per_step)
    hs, saved, rest_in = per_step
    return carry, hs, (saved, rest_in)


def _recurrence_fwd(cell, w_x, b, w_h, carry, xs, mask, reverse, unroll, chunks):
    carry_out, hs, residuals = _forward(
        cell, w_x, b, w_h, carry, xs, mask, reverse, unroll, chunks[0]
    )
    return (carry_out, jnp.swapaxes(hs, 0, 1)), (w_x, w_h, carry[0], xs, mask, hs, residuals)


def _recurrence_bwd(cell, reverse, unroll, chunks, saved_values, cotangents):
    """Reverse-time loop over the gate gradients δpre_t with δh_{t-1} = δpre_t W_hᵀ; per chunk,
    then, δW_x += Σ_t x_tᵀ δpre_t, δW_h += Σ_t h_{t-1}ᵀ δpre_t, δb += Σ_t δpre_t and
    δx_t = δpre_t W_xᵀ as matmuls over the chunk's steps."""
    w_x, w_h, h0, xs, mask, hs, (saved, rest_in) = saved_values
    dcarry, dhs = cotangents
    time = xs.shape[1]
    w_x_t, w_h_t, chunk = w_x.T, w_h.T, chunks[1]

    def step(dcarry, inputs):
        dh_out, saved_t, rest_in_t, m_t = inputs
        dpre, drest_in = cell.backward(dh_out + dcarry[0], dcarry[1:], saved_t, rest_in_t)
        if m_t is not None:
            keep = m_t[:, None]
            dpre = jnp.where(keep, dpre, 0)
        dh_in = dpre @ w_h_t
        if m_t is not None:
            dh_in = jnp.where(keep, dh_in, dcarry[0])
            drest_in = tuple(jnp.where(keep, d, dn) for d, dn in zip(drest_in, dcarry[1:]))
        return (dh_in, *drest_in), dpre

    def run_chunk(state, inputs):
        dcarry, (dw_x, dw_h, db), dxs = state
        start, per_step = inputs
        dh_c = jnp.swapaxes(lax.dynamic_slice_in_dim(dhs, start, chunk, axis=1), 0, 1)
        dcarry, dpre = lax.scan(step, dcarry, (dh_c, *per_step), reverse=not reverse, unroll=unroll)
        x_c = lax.dynamic_slice_in_dim(xs, start, chunk, axis=1)
        h_in_c = _entering(hs, h0, start, chunk, reverse, mask)
        sums = (
            dw_x + jnp.einsum("btf,tbg->fg", x_c, dpre),
            dw_h + jnp.einsum("tbh,tbg->hg", h_in_c, dpre),
            db + jnp.sum(dpre, axis=(0, 1)),
        )
        dxs = lax.dynamic_update_slice_in_dim(dxs, jnp.swapaxes(dpre @ w_x_t, 0, 1), start, axis=1)
        return (dcarry, sums, dxs), None

    sums = (jnp.zeros_like(w_x), jnp.zeros_like(w_h), jnp.zeros((w_h.shape[1],), w_h.dtype))
    per_step = jax.tree.map(lambda a: _in_chunks(a, chunk), (saved, rest_in, mask))
    state = (tuple(dcarry), sums, jnp.zeros_like(xs))
    (dcarry0, (dw_x, dw_h, db), dxs), _ = lax.scan(
        run_chunk, state, (_chunk_starts(time, chunk), per_step), reverse=not reverse
    )
    return dw_x, db, dw_h, dcarry0, dxs, None


_recurrence_core.defvjp(_recurrence_fwd, _recurrence_bwd)


def _entering(
    hs: Array, h0: Array, start: Array, length: int, reverse: bool, mask: Array | None
) -> Array:
    """h entering the steps start .. start+length-1, [length, batch, hidden], from the outputs hs
    [time, batch, hidden]: the neighbour's output (t-1, or t+1 when reverse), h0 at the first
    step. With ``mask``, a step whose neighbour is masked starts from h0: read backwards, that is
    a sequence's last real step (its outputs are zero beyond); read forwards, such a step is
    masked itself and its value is never used."""
    time = hs.shape[0]
    if not reverse:
        before = lax.dynamic_index_in_dim(hs, jnp.maximum(start - 1, 0), keepdims=False)
        first = jnp.where(start == 0, h0, before)[None]
        return jnp.concatenate([first, lax.dynamic_slice_in_dim(hs, start, length - 1)])
    end = start + length
    after = lax.dynamic_index_in_dim(hs, jnp.minimum(end, time - 1), keepdims=False)
    last = jnp.where(end >= time, h0, after)[None]
    before = jnp.concatenate([lax.dynamic_slice_in_dim(hs, start + 1, length - 1), last])
    if mask is None:
        return before
    neighbour_real = lax.dynamic_slice_in_dim(
        jnp.concatenate([mask[1:], jnp.zeros_like(mask[:1])]), start, length
    )
    return jnp.where(neighbour_real[:, :, None], before, h0[None])


# ---------------------------------------------------------------------------------------------
# Shared pieces: inputs, masks, validation


def _zero_padding(xs: Array, mask: Array | None) -> Array:
    """xs [batch, time, features] with the steps past a sequence's length (mask [time, batch]
    False) read as zeros, so that whatever the padding holds (NaN included) reaches neither the
    outputs nor any gradient."""
    return xs if mask is None else jnp.where(mask.T[:, :, None], xs, 0)


def _time_mask(seq_lengths: Array | None, batch: int, time: int) -> Array | None:
    """[time, batch] booleans, True where t < seq_lengths[b]; None for full-length sequences."""
    if seq_lengths is None:
        return None
    seq_lengths = jnp.asarray(seq_lengths)
    if seq_lengths.shape != (batch,):
        raise ValueError(
            f"expected seq_lengths of shape [batch]=({batch},), got shape {seq_lengths.shape}"
        )
    if not jnp.issubdtype(seq_lengths.dtype, jnp.integer):
        raise TypeError(
            f"expected integer seq_lengths of shape [batch]=({batch},), got dtype {seq_lengths.dtype}"
        )
    checks.in_range(seq_lengths, 0, time, f"seq_lengths in [0, time={time}]")
    return jnp.arange(time, dtype=seq_lengths.dtype)[:, None] < seq_lengths[None, :]


def _check_impl(impl: str, allowed: tuple[str, ...] = IMPLS) -> None:
    if impl not in allowed:
        raise ValueError(f"expected impl to be one of {allowed}, got {impl!r}")


def _check_params(params: dict, xs: Array, *, blocks: int, cell: str) -> int:
    """Validate params against the pinned layout (hidden >= 1) and the features of xs
    [batch, time, features] (rank and dtype checked by ``checks.sequences``); return hidden."""
    missing = {"w_x", "w_h", "b"} - set(params)
    if missing:
        raise ValueError(f"expected {cell} params with keys w_x, w_h, b; missing {sorted(missing)}")
    w_x, w_h, b = (jnp.shape(params[k]) for k in ("w_x", "w_h", "b"))
    hidden = w_h[0] if len(w_h) == 2 else -1
    gates = blocks * hidden
    if hidden < 1 or w_h != (hidden, gates) or len(w_x) != 2 or w_x[1] != gates or b != (gates,):
        g = "4*hidden" if blocks == 4 else "hidden"
        raise ValueError(
            f"expected {cell} params w_x [features, {g}], w_h [hidden, {g}], b [{g}] (hidden >= 1), "
            f"got w_x {w_x}, w_h {w_h}, b {b}"
        )
    if xs.shape[-1] != w_x[0]:
        raise ValueError(
            f"expected xs [batch, time, features={w_x[0]}] to match w_x {w_x}, got shape {xs.shape}"
        )
    return hidden


def _check_carry(carry: Array, batch: int, hidden: int, name: str, dtype) -> Array:
    """carry [batch, hidden], cast to ``dtype``."""
    if jnp.shape(carry) != (batch, hidden):
        raise ValueError(
            f"expected initial carry {name} of shape [batch, hidden]=({batch}, {hidden}), "
            f"got shape {jnp.shape(carry)}"
        )
    return jnp.asarray(carry).astype(dtype)


def _promoted(xs: Array, params: dict) -> tuple[Array, dict]:
    """xs and the weights w_x, w_h, b cast to their promoted dtype (``checks.promote_types``)."""
    weights = {k: jnp.asarray(params[k]) for k in ("w_x", "w_h", "b")}
    dtype = checks.promote_types(xs.dtype, *(w.dtype for w in weights.values()))
    return xs.astype(dtype), {k: w.astype(dtype) for k, w in weights.items()}
