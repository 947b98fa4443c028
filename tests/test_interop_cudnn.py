"""``jaxmodels.interop.cudnn``: the flat LSTM weight vector of ``jax.experimental.rnn``.

The layout is checked against jax's own ``unpack_lstm_weights`` and ``get_num_params_in_lstm``;
round trips bitwise (cuDNN's two biases come back summed, as documented); outputs, final states
and gradients (inputs, initial states, the flat weights) against jax's ``lstm_ref``, its reference
LSTM, which runs on the CPU. Its cuDNN ``lstm`` needs a GPU: ``test_parity_with_cudnn_lstm`` runs
only there (JAX_PLATFORMS=cuda). The largest differences are recorded in ``DIFFS`` and printed
when the module finishes (visible with ``pytest -s``).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _diffs import DiffLog, assert_same_bits
from jax.experimental import rnn

import jaxmodels
from jaxmodels.interop.cudnn import from_cudnn, to_cudnn

BATCH, TIME, FEATURES, HIDDEN = 3, 5, 4, 6
SEQ_LENGTHS = np.array([5, 1, 3], np.int32)  # >= 1: lstm_ref reads a length 0 as the last step
# The sizes that to_cudnn, from_cudnn and jax's unpack_lstm_weights take, per case.
CONFIGS = [
    dict(input_size=FEATURES, hidden_size=HIDDEN, num_layers=n, bidirectional=bi)
    for n, bi in [(1, False), (1, True), (2, False), (3, True)]
]
IDS = [f"{c['num_layers']}layers-{'bi' if c['bidirectional'] else 'uni'}" for c in CONFIGS]
each_config = pytest.mark.parametrize("sizes", CONFIGS, ids=IDS)
TOL = {"outputs": 1e-5, "gradients": 1e-4}  # absolute, float32

DIFFS = DiffLog("Largest |ours - jax.experimental.rnn| per test (tests/test_interop_cudnn.py)")


@pytest.fixture(scope="module", autouse=True)
def _print_max_diffs():
    yield
    DIFFS.report()


def our_variables(sizes, seed=0):
    """jaxmodels.LSTM's variables, every leaf random normal; each b has zeros of both signs."""
    module = jaxmodels.LSTM(HIDDEN, sizes["num_layers"], sizes["bidirectional"])
    variables = module.init(jax.random.key(seed), jnp.zeros((BATCH, TIME, FEATURES)))
    rng = np.random.default_rng(seed)

    def leaf(path, like):
        value = (0.5 * rng.standard_normal(like.shape)).astype(np.float32)
        if path[-1].key == "b":
            value[:2] = (0.0, -0.0)
        return jnp.asarray(value)

    return jax.tree_util.tree_map_with_path(leaf, variables)


def random_weights(sizes, seed=0):
    n = rnn.get_num_params_in_lstm(**sizes)
    return jnp.asarray(np.random.default_rng(seed).standard_normal(n).astype(np.float32))


def names(sizes):
    """Our layer names in cuDNN's pseudo-layer order."""
    suffixes = ("", "_reverse") if sizes["bidirectional"] else ("",)
    return [f"layer_{k}{s}" for k in range(sizes["num_layers"]) for s in suffixes]


def assert_negative_zeros(a, what=""):
    a = np.asarray(a)
    assert np.all(a == 0) and np.all(np.signbit(a)), f"{what}: not all -0.0"


# ---------------------------------------------------------------------------------------------
# The layout and round trips


@each_config
def test_to_cudnn_unpacks_with_jax(sizes):
    variables = our_variables(sizes)
    weights = to_cudnn(variables, **sizes)
    assert weights.shape == (rnn.get_num_params_in_lstm(**sizes),)
    assert weights.dtype == jnp.float32
    w_ih, w_hh, b_ih, b_hh = rnn.unpack_lstm_weights(weights, **sizes)
    for pseudo, name in enumerate(names(sizes)):
        p = variables["params"][name]
        assert_same_bits(w_ih[pseudo], p["w_x"].T, f"W_ih of {name}")
        assert_same_bits(w_hh[pseudo], p["w_h"].T, f"W_hh of {name}")
        assert_same_bits(b_ih[pseudo], p["b"], f"b_ih of {name}")
        assert_negative_zeros(b_hh[pseudo], f"b_hh of {name}")


@each_config
def test_from_cudnn_unpacks_as_jax(sizes):
    weights = random_weights(sizes)
    params = from_cudnn(weights, **sizes)["params"]
    assert set(params) == set(names(sizes))
    w_ih, w_hh, b_ih, b_hh = rnn.unpack_lstm_weights(weights, **sizes)
    for pseudo, name in enumerate(names(sizes)):
        assert_same_bits(params[name]["w_x"], w_ih[pseudo].T, f"w_x of {name}")
        assert_same_bits(params[name]["w_h"], w_hh[pseudo].T, f"w_h of {name}")
        assert_same_bits(params[name]["b"], b_ih[pseudo] + b_hh[pseudo], f"b of {name}")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@each_config
def test_round_trip_from_ours_is_exact(sizes, dtype):
    variables = jax.tree.map(lambda a: a.astype(dtype), our_variables(sizes))
    weights = to_cudnn(variables, **sizes)
    assert weights.dtype == jnp.dtype(dtype)
    back = from_cudnn(weights, **sizes)
    assert jax.tree.structure(back) == jax.tree.structure(variables)
    for path, leaf in jax.tree_util.tree_leaves_with_path(variables):
        name = "/".join(k.key for k in path)
        assert_same_bits(back["params"][path[1].key][path[2].key], leaf, name)


@each_config
def test_round_trip_from_cudnn_sums_the_biases(sizes):
    weights = random_weights(sizes)
    again = to_cudnn(from_cudnn(weights, **sizes), **sizes)
    w_ih, w_hh, b_ih, b_hh = rnn.unpack_lstm_weights(weights, **sizes)
    w_ih2, w_hh2, b_ih2, b_hh2 = rnn.unpack_lstm_weights(again, **sizes)
    for pseudo in range(len(w_ih)):
        assert_same_bits(w_ih2[pseudo], w_ih[pseudo], f"W_ih^{pseudo}")
        assert_same_bits(w_hh2[pseudo], w_hh[pseudo], f"W_hh^{pseudo}")
        assert_same_bits(b_ih2[pseudo], b_ih[pseudo] + b_hh[pseudo], f"b_ih^{pseudo}")
        assert_negative_zeros(b_hh2[pseudo], f"b_hh^{pseudo}")


def test_converts_under_jit():
    sizes = CONFIGS[-1]
    weights = random_weights(sizes)
    unpacked = jax.jit(functools.partial(from_cudnn, **sizes))(weights)
    assert jax.tree.all(jax.tree.map(np.array_equal, unpacked, from_cudnn(weights, **sizes)))
    packed = jax.jit(functools.partial(to_cudnn, **sizes))(unpacked)
    np.testing.assert_array_equal(packed, to_cudnn(unpacked, **sizes))


# ---------------------------------------------------------------------------------------------
# Parity with jax.experimental.rnn


def lstm_ref(sizes):
    """(weights, x, h_0, c_0) -> (y, h_n, c_n) by jax's reference LSTM on SEQ_LENGTHS."""

    def run(weights, x, h_0, c_0):
        unpacked = rnn.unpack_lstm_weights(weights, **sizes)
        n, bi = sizes["num_layers"], sizes["bidirectional"]
        return rnn.lstm_ref(x, h_0, c_0, *unpacked, SEQ_LENGTHS, FEATURES, HIDDEN, n, 0.0, bi)

    return run


def check_parity(case, weights, sizes, theirs, impl="auto"):
    """Ours (from_cudnn, then jaxmodels.LSTM) against ``theirs`` on random x, h_0, c_0 and
    SEQ_LENGTHS: y, h_n, c_n, and the gradients of sum(y cy) + sum(h_n ch) + sum(c_n cc) with
    respect to the flat weights, x, h_0 and c_0."""
    module = jaxmodels.LSTM(HIDDEN, sizes["num_layers"], sizes["bidirectional"], impl=impl)

    def ours(weights, x, h_0, c_0):
        variables = from_cudnn(weights, **sizes)
        y, (h_n, c_n) = module.apply(variables, x, (h_0, c_0), seq_lengths=SEQ_LENGTHS)
        return y, h_n, c_n

    rng = np.random.default_rng(3)
    directions = 2 if sizes["bidirectional"] else 1
    states = (sizes["num_layers"] * directions, BATCH, HIDDEN)
    draw = lambda *shape: rng.standard_normal(shape).astype(np.float32)
    x, h_0, c_0 = draw(BATCH, TIME, FEATURES), draw(*states), draw(*states)
    cots = (draw(BATCH, TIME, directions * HIDDEN), draw(*states), draw(*states))  # y, h_n, c_n

    def grads(f):
        def loss(*args):
            outs = f(*args)
            return sum(jnp.sum(a * c) for a, c in zip(outs, cots)), outs

        return jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3), has_aux=True))(weights, x, h_0, c_0)

    (d_ours, outs_ours), (d_theirs, outs_theirs) = grads(ours), grads(theirs)
    for quantity, a, b in zip(("y", "h_n", "c_n"), outs_ours, outs_theirs):
        DIFFS.assert_close(case, quantity, a, b, TOL["outputs"])
    assert np.all(np.asarray(outs_ours[0])[np.arange(TIME) >= SEQ_LENGTHS[:, None]] == 0)
    for quantity, a, b in zip(("grad weights", "grad x", "grad h_0", "grad c_0"), d_ours, d_theirs):
        DIFFS.assert_close(case, quantity, a, b, TOL["gradients"])


@pytest.mark.parametrize("direction", ["to_cudnn", "from_cudnn"])
@each_config
def test_parity_with_lstm_ref(direction, sizes, request):
    """to_cudnn: our random variables (b_hh = -0.0); from_cudnn: random flat weights (b_hh not
    zero). Outputs, final states and gradients, with seq_lengths and initial states."""
    if direction == "to_cudnn":
        weights = to_cudnn(our_variables(sizes), **sizes)
    else:
        weights = random_weights(sizes)
    check_parity(request.node.callspec.id, weights, sizes, lstm_ref(sizes))


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="jax.experimental.rnn.lstm needs cuDNN")
@each_config
def test_parity_with_cudnn_lstm(sizes, request):
    """jax's cuDNN lstm itself, float32 matmuls at full precision on both sides (ours the scan)."""
    highest = jax.lax.Precision.HIGHEST
    lengths = jnp.asarray(SEQ_LENGTHS)
    cudnn = lambda w, x, h_0, c_0: rnn.lstm(
        x, h_0, c_0, w, lengths, **sizes, dropout=0.0, precision=highest
    )
    with jax.default_matmul_precision("highest"):
        case = "cudnn-" + request.node.callspec.id
        check_parity(case, random_weights(sizes), sizes, cudnn, impl="scan")


# ---------------------------------------------------------------------------------------------
# Errors


def test_wrong_length_names_the_expected_one():
    sizes = CONFIGS[-1]
    n = rnn.get_num_params_in_lstm(**sizes)
    for bad in (jnp.zeros(n + 1), jnp.zeros(n - 4), jnp.zeros((1, n))):
        with pytest.raises(ValueError, match=rf"expected weights of shape \({n},\)"):
            from_cudnn(bad, **sizes)
    with pytest.raises(ValueError, match="floating"):
        from_cudnn(jnp.zeros(n, jnp.int32), **sizes)


def test_variables_of_another_lstm_are_named():
    two_bi = dict(CONFIGS[-1], num_layers=2)
    variables = our_variables(two_bi)
    with pytest.raises(ValueError, match=r"missing: \['params/layer_2/b', .*not in it: \[\]"):
        to_cudnn(variables, **dict(two_bi, num_layers=3))
    with pytest.raises(ValueError, match=r"missing: \[\], not in it: \['params/layer_0_reverse/b'"):
        to_cudnn(variables, **dict(two_bi, bidirectional=False))
    with pytest.raises(ValueError, match=r"not in it: \['batch_stats'\]"):
        to_cudnn({**variables, "batch_stats": {}}, **two_bi)
    with pytest.raises(ValueError, match=r"expected Flax variables"):
        to_cudnn(variables["params"]["layer_0"], **two_bi)


def test_wrong_shape_names_the_parameter_and_both_shapes():
    variables = our_variables(CONFIGS[0])
    match = r"params/layer_0/w_x has shape \(4, 24\), .* needs \(5, 24\)"
    with pytest.raises(ValueError, match=match):
        to_cudnn(variables, **dict(CONFIGS[0], input_size=FEATURES + 1))


def test_mixed_dtypes_and_bad_sizes_raise():
    sizes = CONFIGS[0]
    variables = our_variables(sizes)
    variables["params"]["layer_0"]["b"] = variables["params"]["layer_0"]["b"].astype(jnp.bfloat16)
    with pytest.raises(ValueError, match=r"one floating dtype.*params/layer_0/b bfloat16"):
        to_cudnn(variables, **sizes)
    with pytest.raises(ValueError, match="hidden_size"):
        from_cudnn(jnp.zeros(8), **dict(sizes, hidden_size=0))
    with pytest.raises(TypeError, match="bidirectional"):
        from_cudnn(jnp.zeros(8), **dict(sizes, bidirectional=1))
