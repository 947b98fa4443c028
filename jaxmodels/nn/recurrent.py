"""LSTM and simple-RNN recurrences over whole sequences: ``lstm_scan`` and ``rnn_scan`` validate
their arguments, plan what runs (the fused scan of ``jaxmodels.nn.fused``, or on GPU/TPU a Pallas
kernel of ``jaxmodels.kernels`` where one fits) and run it.

Batch-major at the API (``xs`` [batch, time, features], ``hs`` [batch, time, hidden]). Variable
lengths follow PyTorch's packed sequences: a step at t >= seq_lengths[b] leaves sequence b's carry
unchanged and outputs zeros, so the final carry is each sequence's state at its last real step;
with ``reverse=True`` each sequence is read from its own last real step backwards.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp

from jaxmodels.kernels import grid, lstm_cpu, lstm_grid, lstm_sequence, lstm_stepwise
from jaxmodels.kernels.common import (
    ACTIVATIONS,
    on_platforms,
    rnn_cell,
    target_device_kind,
    target_platform,
)
from jaxmodels.nn import cells, checks
from jaxmodels.nn.fused import LSTM_CELL, recurrence, rnn_cell_ops

Array = jax.Array

IMPLS = ("auto", "scan", "pallas", "cpu")
RNN_IMPLS = ("auto", "scan", "pallas")  # the compiled CPU kernel is the LSTM's only
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
      impl: "scan" (``lax.scan``); "cpu": the compiled CPU kernel ``kernels.lstm_cpu`` when
        lowering for CPU (the scan on GPU/TPU), for float32, bfloat16 or float16 (computed in
        float32), full-length sequences (no seq_lengths) and concrete shapes; "pallas": the
        Pallas kernels, interpreted on CPU and compiled on GPU and TPU: the persistent
        ``kernels.lstm_sequence`` where w_h fits on chip of the device compiled for
        (``lstm_sequence.plan``), else on GPU the grid-persistent ``kernels.lstm_grid`` where
        a slice of w_h fits each SM (``lstm_grid.plan``; not yet validated on a device), else
        ``kernels.lstm_stepwise`` (one kernel a step);
        "auto": on GPU/TPU the persistent kernel where it fits and xs and params are all float32
        or all bfloat16, on CPU the "cpu" kernel where it applies and could be built
        (``lstm_cpu.unavailable()``; a warning once if it could not), the scan otherwise.
    Returns:
      ((h_T, c_T), hs) with h_T, c_T [batch, hidden] and hs [batch, time, hidden]: the carry
      first, as ``lax.scan`` returns it (the modules return PyTorch's (outputs, carry)).
    Raises:
      ValueError / TypeError naming the expected value, for any of the above not met (shapes,
      dtypes, impl, unroll, and seq_lengths' values when concrete).

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from jaxmodels.nn.cells import init_lstm
      >>> params = init_lstm(jax.random.key(0), 3, 5)
      >>> xs = jnp.ones((2, 7, 3))                       # [batch, time, features]
      >>> (h, c), hs = lstm_scan(params, xs, seq_lengths=jnp.array([7, 4]))
      >>> hs.shape, h.shape
      ((2, 7, 5), (2, 5))
      >>> bool((hs[1, 4:] == 0).all()), bool((h[1] == hs[1, 3]).all())  # past its length: zeros
      (True, True)
    """
    xs, params, carry, unroll, kernel_dtypes = _validate(
        params, xs, initial_carry, impl, unroll, cell="LSTM"
    )
    mask = _time_mask(seq_lengths, *xs.shape[:2])
    xs = _zero_padding(xs, mask)
    hidden = params["w_h"].shape[0]
    native = _cpu_kernel(impl, xs, mask, reverse)
    run = _plan_lstm(
        impl, kernel_dtypes, hidden, xs.dtype, seq_lengths, mask, reverse, unroll, native
    )
    carry, hs = run(params["w_x"], params["w_h"], params["b"], carry, xs)
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
      params: {"w_x": [features, hidden], "w_h": [hidden, hidden], "b": [hidden]} (W, U, b).
      xs: as for ``lstm_scan`` (computed in the promoted dtype of xs and params).
      initial_carry: h_0 [batch, hidden], cast to that dtype; zeros when None.
      seq_lengths, reverse, unroll: as for ``lstm_scan``.
      impl: one of ``RNN_IMPLS``. "auto" and "scan": ``lax.scan`` (the fused scan); "pallas": the
        Pallas kernels, interpreted on CPU and compiled on GPU and TPU, for xs and params all
        float32 or all bfloat16 and a named activation (below): the persistent
        ``kernels.lstm_sequence`` kernel (``rnn_sequence``) where w_h fits on chip of the device
        compiled for (``lstm_sequence.plan``), else on GPU the grid-persistent
        ``kernels.lstm_grid`` kernel (``rnn_grid``) where a slice of w_h fits each SM
        (``grid.plan``; not yet validated on a device); ValueError naming the limits where
        neither fits that device. The input projection x_t W + b is one matmul before the
        kernel, which computes f and the sums in float32.
      activation: f, elementwise (tanh by default): a callable, or a name in
        ``kernels.common.ACTIVATIONS`` ('identity', 'relu', 'tanh', 'sigmoid'). impl="pallas"
        takes a name or one of those functions (``jnp.tanh`` the default); another callable is
        a ValueError there.
    Returns:
      (h_T, hs) with h_T [batch, hidden] and hs [batch, time, hidden].
    Raises:
      ValueError / TypeError as ``lstm_scan``, for an unknown activation, and for impl="pallas"
      with a callable activation that is not one of the named ones or a hidden size no kernel
      takes on the device compiled for.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from jaxmodels.nn.cells import init_rnn
      >>> params = init_rnn(jax.random.key(0), 3, 5)
      >>> h, hs = rnn_scan(params, jnp.ones((2, 7, 3)), activation="relu")
      >>> hs.shape, h.shape
      ((2, 7, 5), (2, 5))
    """
    xs, params, carry, unroll, _ = _validate(params, xs, initial_carry, impl, unroll, cell="RNN")
    activation = checks.activation(activation)
    mask = _time_mask(seq_lengths, *xs.shape[:2])
    xs = _zero_padding(xs, mask)
    hidden = params["w_h"].shape[0]
    run = _plan_rnn(impl, activation, hidden, xs.dtype, seq_lengths, mask, reverse, unroll)
    (h,), hs = run(params["w_x"], params["w_h"], params["b"], carry, xs)
    return h, hs


# ---------------------------------------------------------------------------------------------
# The scans' steps: validate the arguments, plan what runs and run it


def _validate(
    params: dict, xs: Array, initial_carry, impl: str, unroll: int, *, cell: str
) -> tuple[Array, dict, tuple[Array, ...], int, bool]:
    """The scans' arguments (``cell`` "LSTM" or "RNN") checked and cast to the promoted dtype of
    xs and params. Returns (xs [batch, time, features], params {"w_x", "w_h", "b"}, the initial
    carry as a tuple (h_0, c_0) or (h_0,), each [batch, hidden] (zeros for None), unroll,
    kernel_dtypes): whether xs and params came in one dtype of ``KERNEL_DTYPES``, which
    impl='pallas' requires."""
    lstm = cell == "LSTM"
    impls = IMPLS if lstm else RNN_IMPLS
    if impl not in impls:
        raise ValueError(f"expected impl to be one of {impls}, got {impl!r}")
    xs = checks.sequences(xs)
    hidden = _check_params(params, xs, blocks=4 if lstm else 1, cell=cell)
    unroll = checks.size("unroll", unroll)
    param_dtypes = {jnp.result_type(p) for p in params.values()}
    kernel_dtypes = xs.dtype in KERNEL_DTYPES and param_dtypes == {xs.dtype}
    if impl == "pallas" and not kernel_dtypes:
        raise TypeError(
            f"expected xs and params of one dtype, float32 or bfloat16, for impl='pallas', got xs "
            f"{xs.dtype} and params {sorted(map(str, param_dtypes))}"
        )
    xs, params = _promoted(xs, params)
    batch, names = xs.shape[0], "hc" if lstm else "h"
    if initial_carry is None:
        initial_carry = (jnp.zeros((batch, hidden), xs.dtype),) * len(names)
    elif not lstm:
        initial_carry = (initial_carry,)
    elif not (isinstance(initial_carry, (tuple, list)) and len(initial_carry) == 2):
        raise ValueError("expected initial_carry to be a pair (h, c), each [batch, hidden]")
    carry = tuple(_check_carry(c, batch, hidden, n, xs.dtype) for c, n in zip(initial_carry, names))
    return xs, params, carry, unroll, kernel_dtypes


def _cpu_kernel(impl: str, xs: Array, mask: Array | None, reverse: bool) -> Callable | None:
    """The compiled CPU kernel's recurrence (w_x, w_h, b, carry, xs) -> ((h_T, c_T), hs) where
    ``impl`` asks for it ("cpu"; "auto" where it applies) and it can run, else None. Raises for
    impl="cpu" where it cannot, naming what it takes."""
    if impl not in ("auto", "cpu") or (impl == "auto" and jax.default_backend() != "cpu"):
        return None  # "auto" on a GPU/TPU host: not built there, for a CPU lowering it never runs
    why = None
    if xs.dtype not in lstm_cpu.DTYPES:
        why = f"float32, bfloat16 or float16 xs and params (they promote to {xs.dtype})"
    elif mask is not None:
        why = "full-length sequences (seq_lengths=None)"
    elif not all(isinstance(d, int) for d in xs.shape):
        why = f"concrete shapes (xs has symbolic shape {xs.shape})"
    if why is not None:
        if impl == "cpu":
            raise ValueError(f"expected {why} for impl='cpu'")
        return None
    reason = lstm_cpu.unavailable()
    if reason is not None:
        if impl == "cpu":
            raise RuntimeError(f"impl='cpu' cannot run here: {reason}")
        lstm_cpu.warn_unavailable()
        return None
    return functools.partial(lstm_cpu.recurrence, reverse=reverse)


def _plan_lstm(impl, kernel_dtypes, hidden, dtype, seq_lengths, mask, reverse, unroll, native):
    """What ``lstm_scan`` runs, as a function (w_x, w_h, b, (h_0, c_0), xs) -> ((h_T, c_T), hs).

    "scan": the fused scan. Otherwise chosen per lowering platform: "cpu" runs ``native`` (the
    compiled CPU kernel, ``_cpu_kernel``) on CPU and the fused scan elsewhere; "pallas" the
    persistent kernel where w_h fits on chip of the device compiled for, else the grid kernel
    where it fits (GPU), else the stepwise kernel (interpreted on CPU: always the persistent
    kernel); "auto" the persistent kernel where it fits on GPU/TPU (for the dtypes the kernels
    take), else the fused scan, and on CPU ``native`` where it is not None.
    """
    scan = functools.partial(_scan_lstm, mask=mask, reverse=reverse, unroll=unroll)
    if impl == "scan" or (impl == "auto" and native is None and not kernel_dtypes):
        return scan
    if impl == "cpu" or (impl == "auto" and not kernel_dtypes):
        return lambda *args: jax.lax.platform_dependent(*args, cpu=native, default=scan)
    lengths = None if seq_lengths is None else jnp.asarray(seq_lengths, jnp.int32)

    def branch(backend: str) -> Callable:
        if backend == "interpret" and impl == "auto" and native is not None:
            return native  # interpret: lowering for CPU (``on_platforms``)
        kernel = None
        if impl == "pallas" or backend != "interpret":
            kernel = lstm_sequence.sequence_kernel(backend, hidden, dtype, reverse)
        if kernel is None and impl == "pallas":
            kernel = lstm_grid.grid_kernel(backend, hidden, dtype, reverse)
        if kernel is None and impl == "pallas":
            kernel = lstm_stepwise.stepwise_kernel(backend, reverse)
        if kernel is None:
            return scan
        return functools.partial(_run_kernel, kernel, lengths)

    return lambda *args: on_platforms(branch, None, *args)


def _plan_rnn(impl, activation, hidden, dtype, seq_lengths, mask, reverse, unroll):
    """What ``rnn_scan`` runs, as a function (w_x, w_h, b, (h_0,), xs) -> ((h_T,), hs).

    "auto" and "scan": the fused scan. "pallas", chosen per lowering platform: the persistent
    kernel where w_h fits on chip of the device compiled for, else the grid kernel where it fits
    (GPU), else the fused scan (interpreted on CPU: always the persistent kernel); ValueError
    where neither kernel fits the target device (``common.target_platform``), or for an
    activation without a name in ``ACTIVATIONS``.
    """
    scan = functools.partial(
        _scan_rnn, cell=rnn_cell_ops(activation), mask=mask, reverse=reverse, unroll=unroll
    )
    if impl != "pallas":
        return scan
    names = [name for name, (f, _) in ACTIVATIONS.items() if f is activation]
    if not names:
        raise ValueError(
            f"expected activation to be one of {tuple(ACTIVATIONS)} (or its function in "
            f"kernels.common.ACTIVATIONS, jnp.tanh for 'tanh') for impl='pallas', got "
            f"{activation!r}; impl='scan' takes any callable"
        )
    cell = rnn_cell(names[0])

    def kernel(backend: str) -> Callable | None:
        persistent = lstm_sequence.sequence_kernel(backend, hidden, dtype, reverse, cell=cell)
        return persistent or lstm_grid.grid_kernel(backend, hidden, dtype, reverse, cell=cell)

    platform = target_platform()
    if kernel(platform) is None:
        raise ValueError(
            f"expected hidden within the Pallas kernels' limits on {target_device_kind()} for "
            f"impl='pallas' (the persistent kernel: {lstm_sequence.limit_text(platform, dtype, 1)}"
            f"; the grid kernel, GPU only: {grid.limit_text(dtype, 1)}), got hidden={hidden} in "
            f"{jnp.dtype(dtype).name}; impl='scan' takes every size"
        )
    lengths = None if seq_lengths is None else jnp.asarray(seq_lengths, jnp.int32)

    def branch(backend: str) -> Callable:
        found = kernel(backend)  # None: another platform than the target's, lowered beside it
        return scan if found is None else functools.partial(_run_kernel, found, lengths)

    return lambda *args: on_platforms(branch, None, *args)


def _scan_rnn(w_x, w_h, b, carry, xs, *, cell, mask, reverse, unroll):
    """The fused scan (``fused.recurrence``) with the simple RNN's cell."""
    return recurrence(cell, w_x, w_h, b, carry, xs, mask, reverse, unroll)


def _scan_lstm(w_x, w_h, b, carry, xs, *, mask, reverse, unroll):
    """The fused scan (``fused.recurrence``) with the LSTM cell."""
    return recurrence(LSTM_CELL, w_x, w_h, b, carry, xs, mask, reverse, unroll)


def _run_kernel(kernel: Callable, lengths: Array | None, w_x, w_h, b, carry, xs):
    """A kernel recurrence (x_proj, w_h, *carry, lengths) -> (carry, hs [time, batch, hidden])
    over xs [batch, time, features], the carry (h_0, c_0) of the LSTM or (h_0,) of the simple
    RNN: the input projection x_proj = xs W_x + b [time, batch, G*hidden] (G = 4 or 1) as one
    matmul before it; full-length sequences for lengths None."""
    batch, time, _ = xs.shape
    if lengths is None:
        lengths = jnp.full((batch,), time, jnp.int32)
    x_proj = cells.add_bias(jnp.einsum("btf,fg->tbg", xs, w_x), b)
    carry, hs = kernel(x_proj, w_h, *carry, lengths)
    return carry, jnp.swapaxes(hs, 0, 1)


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


def _check_params(params: dict, xs: Array, *, blocks: int, cell: str) -> int:
    """Validate params against the pinned layout (``checks.layer_params``) and the features of xs
    [batch, time, features] (rank and dtype checked by ``checks.sequences``); return hidden."""
    features, hidden = checks.layer_params(params, blocks=blocks, cell=cell)
    if xs.shape[-1] != features:
        raise ValueError(
            f"expected xs [batch, time, features={features}] to match w_x "
            f"{jnp.shape(params['w_x'])}, got shape {xs.shape}"
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
