"""Input validation shared by cells, recurrent, layers and models, and ``checked``.

What the library checks, and when:

- Eagerly, while a function is called or traced, from static information only: ranks, shapes and
  dtypes of arrays (xs [batch, time, features] with batch, time >= 1; features matching the
  parameters), sizes (integers >= 1), rates (in [0, 1]), activations (callables or names). These
  cost nothing at run time, under ``jax.jit`` or not.
- Values (``seq_lengths`` in [0, time], token ids in [0, vocab_size)) only when they are concrete
  (not tracers: called outside ``jax.jit``, ``jax.grad``, ``jax.vmap``, ``lax.scan``, ...). Under
  a transformation they cannot be read: out-of-range lengths then act as clamped to [0, time] and
  token ids >= vocab_size or < -vocab_size give NaN logits (ids in [-vocab_size, 0) read the
  table from its end, as Python indexing), unless the function runs under ``checked`` (or
  ``jax.experimental.checkify.checkify``), where they raise. Outside checkify the traced check is
  ``checkify.debug_check``, which compiles to nothing.

Every error is a ``ValueError`` or ``TypeError`` naming the expected value and what was got.
"""

from __future__ import annotations

import functools
import numbers
import operator
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import checkify

from jaxmodels.kernels.common import ACTIVATIONS

Array = jax.Array


def is_concrete(x) -> bool:
    """Whether x's values can be read here: False for a tracer (under jit, grad, vmap, scan...)
    and for an array not fully addressable by this process (sharded across hosts)."""
    return not isinstance(x, jax.core.Tracer) and getattr(x, "is_fully_addressable", True)


def size(name: str, value, minimum: int = 1) -> int:
    """``value`` as an int; TypeError unless it is an integer (bools are not), ValueError unless it
    is >= ``minimum``."""
    try:
        n = None if isinstance(value, (bool, np.bool_)) else operator.index(value)
    except TypeError:
        n = None
    if n is None:
        raise TypeError(f"expected {name} to be an integer >= {minimum}, got {value!r}")
    if n < minimum:
        raise ValueError(f"expected {name} to be an integer >= {minimum}, got {n}")
    return n


def rate(name: str, value) -> float:
    """``value`` as a float; TypeError unless it is a real number, ValueError unless in [0, 1]."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"expected {name} to be a number in [0, 1], got {value!r}")
    if not 0 <= value <= 1:
        raise ValueError(f"expected {name} in [0, 1], got {value!r}")
    return float(value)


def activation(f) -> Callable[[Array], Array]:
    """A callable as is, or the function of one of the names in ``kernels.common.ACTIVATIONS``
    ('identity', 'relu', 'tanh', 'sigmoid'); ValueError for another name, TypeError otherwise."""
    if callable(f):
        return f
    if isinstance(f, str) and f in ACTIVATIONS:
        return ACTIVATIONS[f][0]
    error = ValueError if isinstance(f, str) else TypeError
    raise error(f"expected activation to be a callable or one of {tuple(ACTIVATIONS)}, got {f!r}")


def layer_params(params, *, blocks: int, cell: str) -> tuple[int, int]:
    """(features, hidden) of one recurrent layer's params in the pinned layout {"w_x": [features,
    G*hidden], "w_h": [hidden, G*hidden], "b": [G*hidden]} with G = ``blocks`` (4 for the LSTM's
    gates, 1 for the simple RNN) and hidden >= 1; TypeError / ValueError naming the layout else."""
    if not isinstance(params, Mapping):
        raise TypeError(
            f"expected {cell} params: a dict with keys w_x, w_h, b, got {type(params).__name__}"
        )
    missing = {"w_x", "w_h", "b"} - set(params)
    if missing:
        raise ValueError(f"expected {cell} params with keys w_x, w_h, b; missing {sorted(missing)}")
    w_x, w_h, b = (np.shape(params[k]) for k in ("w_x", "w_h", "b"))
    hidden = w_h[0] if len(w_h) == 2 else -1
    gates = blocks * hidden
    if hidden < 1 or w_h != (hidden, gates) or len(w_x) != 2 or w_x[1] != gates or b != (gates,):
        g = "4*hidden" if blocks == 4 else "hidden"
        raise ValueError(
            f"expected {cell} params w_x [features, {g}], w_h [hidden, {g}], b [{g}] (hidden >= 1), "
            f"got w_x {w_x}, w_h {w_h}, b {b}"
        )
    return w_x[0], hidden


def sequences(xs) -> Array:
    """xs as an array [batch, time, features] of floats with batch, time >= 1 (a nested list is
    converted); ValueError for another rank or an empty batch or time axis, TypeError for
    non-floating dtypes."""
    xs = jnp.asarray(xs)
    if xs.ndim != 3:
        raise ValueError(f"expected xs of rank 3 [batch, time, features], got shape {xs.shape}")
    if not jnp.issubdtype(xs.dtype, jnp.floating):
        raise TypeError(f"expected floating-point xs [batch, time, features], got dtype {xs.dtype}")
    if xs.shape[1] < 1:
        raise ValueError(
            f"expected at least one time step, got xs of shape {xs.shape} [batch, time, features]"
        )
    if xs.shape[0] < 1:
        raise ValueError(
            f"expected at least one sequence (batch >= 1), got xs of shape {xs.shape} "
            "[batch, time, features]"
        )
    return xs


def promote_types(*dtypes) -> np.dtype:
    """The dtype the scans and modules compute in for inputs of these dtypes: JAX's standard
    promotion (bfloat16 and float32 -> float32), applied by explicit casts, so the same whatever
    ``jax_numpy_dtype_promotion`` is set to."""
    with jax.numpy_dtype_promotion("standard"):
        return functools.reduce(jnp.promote_types, dtypes)


def in_range(values: Array, low: int, high: int, expected: str) -> None:
    """Check low <= values <= high: concrete values now (ValueError "expected {expected}, got
    values from .. to .."), traced ones with ``checkify.debug_check`` (raised only under
    ``checked`` / ``checkify.checkify``; nothing is computed otherwise)."""
    if is_concrete(values):
        values = np.asarray(values)
        if values.size and (values.min() < low or values.max() > high):
            raise ValueError(
                f"expected {expected}, got values from {values.min()} to {values.max()}"
            )
        return
    message = expected.replace("{", "{{").replace("}", "}}")
    checkify.debug_check(
        jnp.all((values >= low) & (values <= high)),
        f"expected {message}, got values from {{low}} to {{high}}",
        low=jnp.min(values),
        high=jnp.max(values),
    )


def checked(fn: Callable, **jit_kwargs) -> Callable:
    """``fn`` compiled with its traced value checks on: ``jax.jit(checkify.checkify(fn,
    errors=checkify.user_checks), **jit_kwargs)``, raising the first failed check as
    ``checkify.JaxRuntimeError`` (a ``ValueError``) after each call.

    E.g. ``jaxmodels.checked(model.apply, static_argnames="train")(variables, tokens)`` raises on
    token ids outside the vocabulary, and ``checked(lambda p, x, n: lstm_scan(p, x,
    seq_lengths=n))`` on lengths outside [0, time], which ``jax.jit`` alone cannot see.
    Arguments are traced as under ``jax.jit``: Python values go through ``static_argnames`` /
    ``static_argnums`` or a closure. Each call waits for the error flag (one device-to-host
    transfer); to keep calls asynchronous, use ``jax.jit(checkify.checkify(fn,
    errors=checkify.user_checks))`` and check the returned error when convenient.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from jaxmodels.nn.recurrent import lstm_scan
      >>> from jaxmodels.nn.cells import init_lstm
      >>> params, xs = init_lstm(jax.random.key(0), 3, 5), jnp.ones((2, 4, 3))
      >>> scan = checked(lambda p, x, n: lstm_scan(p, x, seq_lengths=n)[1])
      >>> scan(params, xs, jnp.array([4, 2])).shape
      (2, 4, 5)
      >>> scan(params, xs, jnp.array([4, 9]))
      Traceback (most recent call last):
      ...
      jax...JaxRuntimeError: ...
    """
    run = jax.jit(checkify.checkify(fn, errors=checkify.user_checks), **jit_kwargs)

    @functools.wraps(fn)
    def call(*args, **kwargs):
        error, out = run(*args, **kwargs)
        error.throw()
        return out

    return call
