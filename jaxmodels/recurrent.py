"""Fused LSTM and simple-RNN recurrences over whole sequences.

Batch-major at the API (``xs`` [batch, time, features], ``hs`` [batch, time, hidden]), time-major
inside. The input projection of every time step is one matmul ([batch*time, features] x
[features, G*hidden]) before the loop; the loop does one recurrent matmul per step with the gate
math fused around it. The backward pass is a ``custom_vjp``: a reverse-time loop that only
propagates the gate gradients, after which the recurrent weight gradient is one large matmul
(Σ_t h_{t-1}ᵀ δgates_t as [hidden, time*batch] x [time*batch, G*hidden]) instead of one small
matmul per step.

Variable lengths follow PyTorch's packed sequences: a step at t >= seq_lengths[b] leaves
sequence b's carry unchanged and outputs zeros, so the final carry is each sequence's state at its
last real step; with ``reverse=True`` each sequence is read from its own last real step backwards.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxmodels import cells
from jaxmodels.kernels import lstm_sequence

Array = jax.Array

IMPLS = ("auto", "scan", "pallas")


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
      xs: [batch, time, features], floating point.
      initial_carry: (h_0, c_0), each [batch, hidden]; zeros when None.
      seq_lengths: [batch] integers in [0, time], or None for full length.
      reverse: run from the last time step to the first (outputs stay in input time order).
      unroll: time steps per loop iteration, passed to ``lax.scan`` (the kernel ignores it).
      impl: "scan" (``lax.scan``), "pallas" (the ``kernels.lstm_sequence`` kernel: interpreted
        on CPU, compiled on GPU and TPU) or "auto": the kernel when lowering for GPU or TPU and
        it takes the dtype (float32, bfloat16) and w_h fits on chip, the scan otherwise.
    Returns:
      ((h_T, c_T), hs) with h_T, c_T [batch, hidden] and hs [batch, time, hidden].
    """
    _check_impl(impl)
    hidden = _check_params(params, xs, blocks=4, cell="LSTM")
    batch, time, _ = xs.shape
    if initial_carry is None:
        zeros = jnp.zeros((batch, hidden), xs.dtype)
        initial_carry = (zeros, zeros)
    elif not (isinstance(initial_carry, (tuple, list)) and len(initial_carry) == 2):
        raise ValueError("expected initial_carry to be a pair (h, c), each [batch, hidden]")
    initial_carry = tuple(_check_carry(c, batch, hidden, name) for c, name in zip(initial_carry, "hc"))
    mask = _time_mask(seq_lengths, batch, time)
    x_proj = _input_projection(params, xs, mask)

    def scan(x_proj, w_h, h0, c0):
        return _lstm_recurrence(w_h, (h0, c0), x_proj, mask, reverse, unroll)

    def kernel(x_proj, w_h, h0, c0):
        lengths = None if seq_lengths is None else jnp.asarray(seq_lengths)
        return lstm_sequence.lstm_sequence(x_proj, w_h, (h0, c0), lengths, reverse=reverse)

    args = (x_proj, params["w_h"], *initial_carry)
    if impl == "scan" or (impl == "auto" and not lstm_sequence.supports(hidden, x_proj.dtype)):
        carry, hs = scan(*args)
    elif impl == "pallas":
        carry, hs = kernel(*args)
    else:
        carry, hs = lax.platform_dependent(*args, default=scan, cuda=kernel, rocm=kernel, tpu=kernel)
    return carry, jnp.swapaxes(hs, 0, 1)


def rnn_scan(
    params: dict,
    xs: Array,
    initial_carry: Array | None = None,
    *,
    seq_lengths: Array | None = None,
    reverse: bool = False,
    unroll: int = 1,
    impl: str = "auto",
    activation: Callable[[Array], Array] = jnp.tanh,
) -> tuple[Array, Array]:
    """Run ``cells.rnn_cell`` over a whole sequence: h_t = f(x_t W + h_{t-1} U + b).

    Args:
      params: {"w_x": [features, hidden], "w_h": [hidden, hidden], "b": [hidden]}.
      xs: [batch, time, features], floating point.
      initial_carry: h_0 [batch, hidden]; zeros when None.
      seq_lengths, reverse, unroll: as for ``lstm_scan``.
      impl: "auto" or "scan" (the Pallas kernels are LSTM-only).
      activation: f, elementwise (tanh by default).
    Returns:
      (h_T, hs) with h_T [batch, hidden] and hs [batch, time, hidden].
    """
    _check_impl(impl, ("auto", "scan"))
    hidden = _check_params(params, xs, blocks=1, cell="RNN")
    batch, time, _ = xs.shape
    if initial_carry is None:
        initial_carry = jnp.zeros((batch, hidden), xs.dtype)
    initial_carry = _check_carry(initial_carry, batch, hidden, "h")
    mask = _time_mask(seq_lengths, batch, time)
    x_proj = _input_projection(params, xs, mask)
    h, hs = _rnn_recurrence(params["w_h"], initial_carry, x_proj, mask, reverse, unroll, activation)
    return h, jnp.swapaxes(hs, 0, 1)


# ---------------------------------------------------------------------------------------------
# LSTM recurrence with a hand-written backward pass


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _lstm_recurrence(w_h, carry, x_proj, mask, reverse, unroll):
    """carry (h, c) [batch, hidden], x_proj [time, batch, 4*hidden], mask [time, batch] or None.
    Returns ((h_T, c_T), hs [time, batch, hidden])."""
    carry, hs, _ = _lstm_forward(w_h, carry, x_proj, mask, reverse, unroll)
    return carry, hs


def _lstm_forward(w_h, carry, x_proj, mask, reverse, unroll):
    def step(carry, inputs):
        x_t, m_t = inputs
        h, c = carry
        i, f, g, o = cells.lstm_gates(x_t + h @ w_h)
        new_c = f * c + i * g
        new_h = o * jnp.tanh(new_c)
        residual = (jnp.concatenate([i, f, g, o], axis=-1), h, c)
        if m_t is not None:
            keep = m_t[:, None]
            new_h, new_c = jnp.where(keep, new_h, h), jnp.where(keep, new_c, c)
            return (new_h, new_c), (jnp.where(keep, new_h, 0), residual)
        return (new_h, new_c), (new_h, residual)

    carry, (hs, residuals) = lax.scan(step, carry, (x_proj, mask), reverse=reverse, unroll=unroll)
    return carry, hs, residuals


def _lstm_recurrence_fwd(w_h, carry, x_proj, mask, reverse, unroll):
    carry_out, hs, residuals = _lstm_forward(w_h, carry, x_proj, mask, reverse, unroll)
    return (carry_out, hs), (w_h, mask, residuals)


def _lstm_recurrence_bwd(reverse, unroll, saved, cotangents):
    w_h, mask, (acts, h_prev, c_prev) = saved
    (dh_T, dc_T), dhs = cotangents
    w_h_t = w_h.T

    def step(dcarry, inputs):
        dh_next, dc_next = dcarry
        dh_out, act, c_in, m_t = inputs
        i, f, g, o = jnp.split(act, 4, axis=-1)
        c = f * c_in + i * g
        tc = jnp.tanh(c)
        dh = dh_out + dh_next
        dc = dc_next + dh * o * (1 - tc * tc)
        dgates = jnp.concatenate(
            [dc * g * i * (1 - i), dc * c_in * f * (1 - f), dc * i * (1 - g * g), dh * tc * o * (1 - o)],
            axis=-1,
        )
        if m_t is not None:
            dgates = jnp.where(m_t[:, None], dgates, 0)
        dh_prev = dgates @ w_h_t
        dc_prev = dc * f
        if m_t is not None:
            keep = m_t[:, None]
            dh_prev = jnp.where(keep, dh_prev, dh_next)
            dc_prev = jnp.where(keep, dc_prev, dc_next)
        return (dh_prev, dc_prev), dgates

    (dh0, dc0), dgates = lax.scan(
        step, (dh_T, dc_T), (dhs, acts, c_prev, mask), reverse=not reverse, unroll=unroll
    )
    dw_h = jnp.einsum("tbh,tbg->hg", h_prev, dgates)
    return dw_h, (dh0, dc0), dgates, None


_lstm_recurrence.defvjp(_lstm_recurrence_fwd, _lstm_recurrence_bwd)


# ---------------------------------------------------------------------------------------------
# Simple-RNN recurrence with a hand-written backward pass


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _rnn_recurrence(w_h, h, x_proj, mask, reverse, unroll, activation):
    """h [batch, hidden], x_proj [time, batch, hidden], mask [time, batch] or None.
    Returns (h_T, hs [time, batch, hidden])."""
    h, hs, _ = _rnn_forward(w_h, h, x_proj, mask, reverse, unroll, activation)
    return h, hs


def _rnn_forward(w_h, h, x_proj, mask, reverse, unroll, activation):
    def step(h, inputs):
        x_t, m_t = inputs
        pre = x_t + h @ w_h
        new_h = activation(pre)
        if m_t is not None:
            keep = m_t[:, None]
            new_h = jnp.where(keep, new_h, h)
            return new_h, (jnp.where(keep, new_h, 0), (pre, h))
        return new_h, (new_h, (pre, h))

    h, (hs, residuals) = lax.scan(step, h, (x_proj, mask), reverse=reverse, unroll=unroll)
    return h, hs, residuals


def _rnn_recurrence_fwd(w_h, h, x_proj, mask, reverse, unroll, activation):
    h_out, hs, residuals = _rnn_forward(w_h, h, x_proj, mask, reverse, unroll, activation)
    return (h_out, hs), (w_h, mask, residuals)


def _rnn_recurrence_bwd(reverse, unroll, activation, saved, cotangents):
    w_h, mask, (pre, h_prev) = saved
    dh_T, dhs = cotangents
    w_h_t = w_h.T

    def step(dh_next, inputs):
        dh_out, pre_t, m_t = inputs
        dpre = jax.vjp(activation, pre_t)[1](dh_out + dh_next)[0]
        if m_t is None:
            return dpre @ w_h_t, dpre
        keep = m_t[:, None]
        dpre = jnp.where(keep, dpre, 0)
        return jnp.where(keep, dpre @ w_h_t, dh_next), dpre

    dh0, dpre = lax.scan(step, dh_T, (dhs, pre, mask), reverse=not reverse, unroll=unroll)
    dw_h = jnp.einsum("tbh,tbg->hg", h_prev, dpre)
    return dw_h, dh0, dpre, None


_rnn_recurrence.defvjp(_rnn_recurrence_fwd, _rnn_recurrence_bwd)


# ---------------------------------------------------------------------------------------------
# Shared pieces: input projection, masks, validation


def _input_projection(params: dict, xs: Array, mask: Array | None) -> Array:
    """x_t W_x + b for every step as one matmul: [batch, time, features] -> [time, batch, G*hidden].

    Steps past a sequence's length (mask [time, batch] False) are read as zeros, so that whatever
    the padding holds (NaN included) reaches neither the outputs nor any gradient.
    """
    if mask is not None:
        xs = jnp.where(jnp.swapaxes(mask, 0, 1)[:, :, None], xs, 0)
    return cells.add_bias(jnp.einsum("btf,fg->tbg", xs, params["w_x"]), params["b"])


def _time_mask(seq_lengths: Array | None, batch: int, time: int) -> Array | None:
    """[time, batch] booleans, True where t < seq_lengths[b]; None for full-length sequences."""
    if seq_lengths is None:
        return None
    seq_lengths = jnp.asarray(seq_lengths)
    if seq_lengths.shape != (batch,):
        raise ValueError(f"expected seq_lengths of shape [batch]=({batch},), got shape {seq_lengths.shape}")
    if not jnp.issubdtype(seq_lengths.dtype, jnp.integer):
        raise TypeError(f"expected integer seq_lengths of shape [batch]=({batch},), got dtype {seq_lengths.dtype}")
    if not isinstance(seq_lengths, jax.core.Tracer):
        lengths = np.asarray(seq_lengths)
        if lengths.min() < 0 or lengths.max() > time:
            raise ValueError(
                f"expected seq_lengths in [0, time={time}], got values from {lengths.min()} to {lengths.max()}"
            )
    return jnp.arange(time, dtype=seq_lengths.dtype)[:, None] < seq_lengths[None, :]


def _check_impl(impl: str, allowed: tuple[str, ...] = IMPLS) -> None:
    if impl not in allowed:
        raise ValueError(f"expected impl to be one of {allowed}, got {impl!r}")


def _check_params(params: dict, xs: Array, *, blocks: int, cell: str) -> int:
    """Validate params against the pinned layout and xs [batch, time, features]; return hidden."""
    missing = {"w_x", "w_h", "b"} - set(params)
    if missing:
        raise ValueError(f"expected {cell} params with keys w_x, w_h, b; missing {sorted(missing)}")
    w_x, w_h, b = (jnp.shape(params[k]) for k in ("w_x", "w_h", "b"))
    hidden = w_h[0] if len(w_h) == 2 else -1
    gates = blocks * hidden
    if w_h != (hidden, gates) or len(w_x) != 2 or w_x[1] != gates or b != (gates,):
        g = "4*hidden" if blocks == 4 else "hidden"
        raise ValueError(
            f"expected {cell} params w_x [features, {g}], w_h [hidden, {g}], b [{g}], "
            f"got w_x {w_x}, w_h {w_h}, b {b}"
        )
    if jnp.ndim(xs) != 3:
        raise ValueError(f"expected xs of rank 3 [batch, time, features], got shape {jnp.shape(xs)}")
    if not jnp.issubdtype(xs.dtype, jnp.floating):
        raise TypeError(f"expected floating-point xs [batch, time, features], got dtype {xs.dtype}")
    if xs.shape[-1] != w_x[0]:
        raise ValueError(
            f"expected xs [batch, time, features={w_x[0]}] to match w_x, got shape {xs.shape}"
        )
    return hidden


def _check_carry(carry: Array, batch: int, hidden: int, name: str) -> Array:
    if jnp.shape(carry) != (batch, hidden):
        raise ValueError(
            f"expected initial carry {name} of shape [batch, hidden]=({batch}, {hidden}), "
            f"got shape {jnp.shape(carry)}"
        )
    return carry
