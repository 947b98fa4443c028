"""Property-based tests (hypothesis): random shapes, dtypes, lengths, layer counts, directions and
activations for the cells, the scans and the modules either match the numpy oracle of the seed's
equations (tests/_oracles.py) or raise ValueError / TypeError naming the problem, never an internal
error, eagerly and under ``jax.jit``.

Each test has a fixed example budget and is derandomized, so CI runs the same examples every time
in a few seconds; ``HYPOTHESIS_PROFILE=search`` runs many more (a search for new failures).
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _oracles import np_chain, np_lstm_step, np_recurrence, np_rnn_step
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import jaxmodels as jm

settings.register_profile(
    "ci",
    max_examples=20,
    derandomize=True,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("search", max_examples=400, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

ACTIVATIONS = {"tanh": np.tanh, "relu": lambda v: np.maximum(v, 0), "identity": lambda v: v}
TOLERANCE = {jnp.float32: 2e-5, jnp.bfloat16: 6e-2}
small = st.integers(1, 5)


@st.composite
def recurrences(draw, cell):
    """(params, xs, lengths or None, reverse, dtype, activation) of one random layer."""
    batch, time, features, hidden = draw(small), draw(st.integers(1, 7)), draw(small), draw(small)
    blocks = 4 if cell == "lstm" else 1
    rng = np.random.default_rng(draw(st.integers(0, 2**31)))
    params = {
        "w_x": rng.normal(0, 0.5, (features, blocks * hidden)),
        "w_h": rng.normal(0, 0.5, (hidden, blocks * hidden)),
        "b": rng.normal(0, 0.5, (blocks * hidden,)),
    }
    xs = rng.normal(0, 1, (batch, time, features))
    lengths = draw(st.none() | st.lists(st.integers(0, time), min_size=batch, max_size=batch))
    reverse, dtype = draw(st.booleans()), draw(st.sampled_from([jnp.float32, jnp.bfloat16]))
    activation = "tanh" if cell == "lstm" else draw(st.sampled_from(sorted(ACTIVATIONS)))
    return params, xs, lengths, reverse, dtype, activation


def _close(actual, expected, dtype):
    tolerance = TOLERANCE[dtype] * max(1.0, float(np.max(np.abs(expected), initial=0.0)))
    np.testing.assert_allclose(np.asarray(actual, np.float64), expected, atol=tolerance, rtol=0)


@given(recurrences("lstm"), st.booleans())
def test_lstm_scan_matches_the_oracle(case, jitted):
    params, xs, lengths, reverse, dtype, _ = case
    cast = {k: jnp.asarray(v, dtype) for k, v in params.items()}
    xs_in = jnp.asarray(xs, dtype)
    seq = None if lengths is None else jnp.asarray(lengths, jnp.int32)
    scan = lambda p, x, n: jm.lstm_scan(p, x, seq_lengths=n, reverse=reverse, impl="scan")
    (h, c), hs = (jax.jit(scan) if jitted else scan)(cast, xs_in, seq)
    # The oracle sees what the scan computed on: the inputs rounded to the dtype.
    rounded = {k: np.asarray(v, np.float64) for k, v in cast.items()}
    (h_ref, c_ref), hs_ref = np_recurrence(
        "lstm", rounded, np.asarray(xs_in, np.float64), lengths, reverse
    )
    assert hs.dtype == dtype and hs.shape == hs_ref.shape
    for actual, expected in ((h, h_ref), (c, c_ref), (hs, hs_ref)):
        _close(actual, expected, dtype)


@given(recurrences("rnn"), st.booleans())
def test_rnn_scan_matches_the_oracle(case, jitted):
    params, xs, lengths, reverse, dtype, activation = case
    cast = {k: jnp.asarray(v, dtype) for k, v in params.items()}
    xs_in = jnp.asarray(xs, dtype)
    seq = None if lengths is None else jnp.asarray(lengths, jnp.int32)
    scan = lambda p, x, n: jm.rnn_scan(p, x, seq_lengths=n, reverse=reverse, activation=activation)
    h, hs = (jax.jit(scan) if jitted else scan)(cast, xs_in, seq)
    # The oracle's tanh step, with the activation drawn: one explicit loop.
    w_x, w_h, b = (np.asarray(cast[k], np.float64) for k in ("w_x", "w_h", "b"))
    x64 = np.asarray(xs_in, np.float64)
    batch, time, _ = x64.shape
    full = np.full(batch, time) if lengths is None else np.asarray(lengths)
    hs_ref, h_ref = np.zeros((batch, time, w_h.shape[0])), np.zeros((batch, w_h.shape[0]))
    for n in range(batch):
        state = np.zeros(w_h.shape[0])
        steps = range(full[n] - 1, -1, -1) if reverse else range(full[n])
        for t in steps:
            state = np_rnn_step(w_x, w_h, b, state, x64[n, t], ACTIVATIONS[activation])
            hs_ref[n, t] = state
        h_ref[n] = state
    _close(h, h_ref, dtype)
    _close(hs, hs_ref, dtype)


@given(recurrences("lstm"))
def test_the_cells_are_one_step_of_the_oracle(case):
    params, xs, _, _, _, _ = case
    x, hidden = xs[:, 0], params["w_h"].shape[0]
    rng = np.random.default_rng(0)
    h0, c0 = rng.normal(size=(2, x.shape[0], hidden))
    f32 = lambda a: jnp.asarray(a, jnp.float32)
    (h, c), y = jm.lstm_cell(jax.tree.map(f32, params), (f32(h0), f32(c0)), f32(x))
    h_ref, c_ref = np_lstm_step(params["w_x"], params["w_h"], params["b"], h0, c0, x)
    _close(h, h_ref, jnp.float32)
    _close(c, c_ref, jnp.float32)
    np.testing.assert_array_equal(y, h)
    rnn = {k: v[..., :hidden] if k != "w_h" else v[:, :hidden] for k, v in params.items()}
    h_rnn, y_rnn = jm.rnn_cell(jax.tree.map(f32, rnn), f32(h0), f32(x))
    _close(h_rnn, np_rnn_step(rnn["w_x"], rnn["w_h"], rnn["b"], h0, x), jnp.float32)
    np.testing.assert_array_equal(y_rnn, h_rnn)


@given(
    st.sampled_from(["lstm", "rnn"]),
    st.integers(1, 3),
    st.booleans(),
    small,
    st.integers(1, 5),
    st.integers(0, 2**31),
)
@settings(max_examples=8)  # each example compiles a stack of layers
def test_the_modules_match_the_stacked_oracle(cell, layers, bidirectional, hidden, time, seed):
    module_type = jm.LSTM if cell == "lstm" else jm.SimpleRNN
    module = module_type(hidden_size=hidden, num_layers=layers, bidirectional=bidirectional)
    rng = np.random.default_rng(seed)
    xs = jnp.asarray(rng.normal(size=(2, time, 3)), jnp.float32)
    lengths = jnp.asarray(rng.integers(0, time + 1, size=2), jnp.int32)
    variables = module.init(jax.random.key(seed % 1000), xs)
    outputs, carry = jax.jit(lambda v, x, n: module.apply(v, x, seq_lengths=n))(
        variables, xs, lengths
    )
    params = jax.tree.map(lambda a: np.asarray(a, np.float64), variables["params"])
    out_ref, carry_ref = np_chain(cell, params, xs, layers, bidirectional, np.asarray(lengths))
    _close(outputs, out_ref, jnp.float32)
    for actual, expected in zip(jax.tree.leaves(carry), jax.tree.leaves(carry_ref)):
        _close(actual, expected, jnp.float32)


# ------------------------------------------------------------------------------ bad input

shapes = st.lists(st.integers(0, 4), min_size=0, max_size=4).map(tuple)
junk = st.one_of(
    shapes.map(lambda s: np.ones(s, np.float32)),
    shapes.map(lambda s: np.ones(s, np.int32)),
    st.sampled_from([None, "abc", 3, -1, 2.5, [], [[1.0]], True]),
)


def _raises_only_named_errors(call):
    """``call()`` succeeds or raises ValueError / TypeError with a message; anything else fails."""
    try:
        call()
    except (ValueError, TypeError) as err:
        assert str(err).strip(), f"{type(err).__name__} without a message"


@given(
    st.sampled_from(["lstm_scan", "rnn_scan"]),
    st.fixed_dictionaries({"w_x": junk, "w_h": junk, "b": junk}) | junk,
    junk,
    st.fixed_dictionaries(
        {},
        optional={
            "seq_lengths": junk,
            "unroll": st.sampled_from([0, -2, 1.5, "2", 3]),
            "impl": st.sampled_from(["scan", "auto", "pallas", "cuda", ""]),
            "initial_carry": junk,
        },
    ),
    st.booleans(),
)
def test_bad_arguments_to_the_scans_raise_named_errors(name, params, xs, options, jitted):
    scan = getattr(jm, name)
    if jitted:
        _raises_only_named_errors(lambda: jax.jit(lambda p, x: scan(p, x, **options))(params, xs))
    else:
        _raises_only_named_errors(lambda: scan(params, xs, **options))


@given(
    st.sampled_from([jm.LSTM, jm.SimpleRNN]),
    st.fixed_dictionaries(
        {
            "hidden_size": st.sampled_from([0, -1, 2, 2.5, "4"]),
            "num_layers": st.sampled_from([0, 1, 2, 1.0]),
            "dropout_rate": st.sampled_from([0.0, 0.5, 1.5, -0.1]),
            "bidirectional": st.booleans(),
        }
    ),
    junk,
)
def test_bad_module_settings_and_inputs_raise_named_errors(module_type, fields, xs):
    module = module_type(**fields)
    _raises_only_named_errors(lambda: module.init(jax.random.key(0), xs))


@pytest.mark.parametrize("cell", ["lstm_cell", "rnn_cell"])
@given(params=st.fixed_dictionaries({"w_x": junk, "w_h": junk, "b": junk}), x=junk, h=junk)
def test_bad_arguments_to_the_cells_raise_named_errors(cell, params, x, h):
    carry = (h, h) if cell == "lstm_cell" else h
    _raises_only_named_errors(lambda: getattr(jm, cell)(params, carry, x))
