"""Tests of the Flax modules in ``jaxmodels.nn.layers``: CNN, SimpleRNN, LSTM.

References are independent of the code under test where possible: parameter counts from the
convolution arithmetic, the float64 numpy loop over the seed's equations (tests/_oracles.py), JAX
autodiff of a plain ``lax.scan`` for gradients, and the pinned ``lstm_scan`` / ``rnn_scan`` for the
layering.

Speed: eager ``lax.scan`` recompiles on every call, so modules are applied under ``jax.jit`` and
built once per configuration (``_built``); only the "exactly equal" and "no jit" checks run eagerly.
"""

from __future__ import annotations

import functools
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _oracles import np_chain, np_recurrence

import jaxmodels
from jaxmodels import CNN, LSTM, SimpleRNN

BATCH, TIME, FEATURES, HIDDEN = 3, 7, 5, 6
LENGTHS = (TIME, 3, 0)  # full, partial and empty sequences

# cell name -> (module class, pinned scan, number of gate blocks)
CELLS = {
    "lstm": (LSTM, jaxmodels.lstm_scan, 4),
    "rnn": (SimpleRNN, jaxmodels.rnn_scan, 1),
}
# the pinned scans under jit (compiled once per shape and direction, shared by all tests)
JIT_SCANS = {
    name: jax.jit(scan, static_argnames=("reverse", "unroll", "impl"))
    for name, (_, scan, _) in CELLS.items()
}


def _count(tree) -> int:
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree))


def _normal(shape, seed: int = 0):
    """Standard-normal float32 test data from numpy (eager jax.random would compile per shape)."""
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def _xs(seed: int = 0, batch: int = BATCH, time: int = TIME, features: int = FEATURES):
    return _normal((batch, time, features), seed)


@functools.cache
def _variables(cell: str, num_layers: int = 1, bidirectional: bool = False) -> dict:
    """Parameters of a ``CELLS[cell]`` module for ``_xs()`` (``init`` under jit: one compilation
    instead of one per initialiser op and shape; test_models.py runs the eager init)."""
    module = CELLS[cell][0](HIDDEN, num_layers=num_layers, bidirectional=bidirectional)
    return jax.jit(module.init)(jax.random.key(1), _xs())


@functools.cache
def _module(cell: str, **config):
    module = CELLS[cell][0](HIDDEN, **config)
    return module, jax.jit(module.apply, static_argnames=("train",))


def _built(cell: str, **config):
    """(module, variables, jitted apply) for ``CELLS[cell]`` with ``config``, each made once."""
    module, apply = _module(cell, **config)
    return (
        module,
        _variables(cell, config.get("num_layers", 1), config.get("bidirectional", False)),
        apply,
    )


def _leaves_close(a, b, **tol):
    chex.assert_trees_all_equal_structs(a, b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x, np.float32), np.asarray(y, np.float32), **tol)


TIGHT = dict(rtol=1e-6, atol=1e-6)  # jit vs jit of the same math, different program boundaries
REF = dict(rtol=1e-5, atol=1e-5)  # float32 vs the float64 numpy loop


# ---------------------------------------------------------------------------------------------
# Independent references


def _conv_out(size: int, kernel: int, padding: str) -> int:
    return size if padding == "SAME" else size - kernel + 1


def expected_cnn_params(
    height=28,
    width=28,
    channels=1,
    features=(32, 64, 64),
    kernel_size=(3, 3),
    pool_after=(True, True, False),
    pool_size=(2, 2),
    padding="VALID",
    dense_features=(64,),
    num_classes=10,
):
    """(parameter count, flatten size) of the CNN, from convolution arithmetic alone."""
    total, c, h, w = 0, channels, height, width
    kh, kw = kernel_size
    for f, pool in zip(features, pool_after):
        total += kh * kw * c * f + f
        c = f
        h, w = _conv_out(h, kh, padding), _conv_out(w, kw, padding)
        if pool:
            h, w = h // pool_size[0], w // pool_size[1]
    flat = h * w * c
    width_in = flat
    for d in dense_features:
        total += width_in * d + d
        width_in = d
    total += width_in * num_classes + num_classes
    return total, flat


def _autodiff_scan(cell: str):
    """A plain lax.scan over the equations (no custom_vjp), with lstm_scan's calling convention."""

    def scan(params, xs, initial_carry=None, *, seq_lengths=None, reverse=False):
        batch, time, _ = xs.shape
        hidden = params["w_h"].shape[0]
        if seq_lengths is None:
            mask = jnp.ones((time, batch), bool)
        else:
            mask = jnp.arange(time)[:, None] < seq_lengths[None, :]
        xs_t = jnp.swapaxes(xs, 0, 1)

        def lstm_step(carry, inp):
            x, m = inp
            h, c = carry
            z = x @ params["w_x"] + h @ params["w_h"] + params["b"][None, :]
            i, f, g, o = jnp.split(z, 4, axis=-1)
            nc = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
            nh = jax.nn.sigmoid(o) * jnp.tanh(nc)
            nh, nc = jnp.where(m[:, None], nh, h), jnp.where(m[:, None], nc, c)
            return (nh, nc), jnp.where(m[:, None], nh, 0.0)

        def rnn_step(h, inp):
            x, m = inp
            nh = jnp.tanh(x @ params["w_x"] + h @ params["w_h"] + params["b"][None, :])
            nh = jnp.where(m[:, None], nh, h)
            return nh, jnp.where(m[:, None], nh, 0.0)

        zeros = jnp.zeros((batch, hidden), xs.dtype)
        if cell == "lstm":
            carry, hs = jax.lax.scan(lstm_step, (zeros, zeros), (xs_t, mask), reverse=reverse)
        else:
            carry, hs = jax.lax.scan(rnn_step, zeros, (xs_t, mask), reverse=reverse)
        return carry, jnp.swapaxes(hs, 0, 1)

    return scan


def _chain(
    cell, params, xs, num_layers, bidirectional, seq_lengths=None, initial_carry=None, scan=None
):
    """The stacked (bi)directional recurrence by hand, layer by layer.

    Returns (outputs of the last layer, [final carry of (layer, direction)] in the order
    layer*directions + direction)."""
    directions = 2 if bidirectional else 1
    if scan is None:
        # the jitted pinned scan, always called with lengths and a carry so that one compilation per
        # (features, direction) serves every test; full lengths and zeros mean "none" exactly
        scan = JIT_SCANS[cell]
        batch, time = xs.shape[:2]
        if seq_lengths is None:
            seq_lengths = np.full((batch,), time, np.int32)
        if initial_carry is None:
            zeros = np.zeros((num_layers * directions, batch, HIDDEN), np.float32)
            initial_carry = (zeros, zeros) if cell == "lstm" else zeros
    finals = []
    for layer in range(num_layers):
        outs = []
        for direction in range(directions):
            name = f"layer_{layer}" + ("_reverse" if direction else "")
            index = layer * directions + direction
            carry0 = (
                None
                if initial_carry is None
                else jax.tree.map(lambda a: np.asarray(a)[index], initial_carry)
            )
            final, hs = scan(
                params[name], xs, carry0, seq_lengths=seq_lengths, reverse=bool(direction)
            )
            finals.append(final)
            outs.append(hs)
        xs = jnp.concatenate(outs, axis=-1) if bidirectional else outs[0]
    return xs, finals


def _stack(finals):
    return jax.tree.map(lambda *a: jnp.stack(a), *finals)


# ---------------------------------------------------------------------------------------------
# CNN


@pytest.fixture(scope="module")
def seed_cnn():
    """CNN() on [2, 28, 28, 1], traced abstractly: (logits, variables) as shapes and dtypes.
    (Concrete runs of CNN() are in test_models.py; the small CNNs below run concretely here.)"""
    x = jax.ShapeDtypeStruct((2, 28, 28, 1), jnp.float32)
    return jax.eval_shape(CNN().init_with_output, jax.random.key(1), x)


def test_cnn_default_has_93322_parameters(seed_cnn):
    _, variables = seed_cnn
    assert set(variables) == {"params"}
    assert _count(variables["params"]) == 93_322
    assert expected_cnn_params() == (93_322, 576)  # the independent arithmetic agrees with the seed


def test_cnn_default_layer_shapes_match_seed(seed_cnn):
    _, variables = seed_cnn
    layers = list(variables["params"].values())  # creation order
    kernels = [tuple(layer["kernel"].shape) for layer in layers]
    biases = [tuple(layer["bias"].shape) for layer in layers]
    assert kernels == [(3, 3, 1, 32), (3, 3, 32, 64), (3, 3, 64, 64), (576, 64), (64, 10)]
    assert biases == [(32,), (64,), (64,), (64,), (10,)]
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(variables))


@pytest.mark.parametrize("batch", [1, 3])
def test_cnn_default_output_shape(batch):
    x = jax.ShapeDtypeStruct((batch, 28, 28, 1), jnp.float32)
    logits, _ = jax.eval_shape(CNN().init_with_output, jax.random.key(1), x)
    assert logits.shape == (batch, 10)
    assert logits.dtype == jnp.float32


CNN_CONFIGS = [
    dict(padding="SAME"),
    dict(
        height=16,
        width=16,
        features=(8, 16),
        pool_after=(True, True),
        dense_features=(32, 16),
        num_classes=5,
    ),
    dict(
        height=16,
        width=20,
        features=(4, 8, 8),
        kernel_size=(5, 5),
        pool_after=(False, True, True),
        padding="SAME",
        num_classes=3,
    ),
    dict(height=10, width=10, features=(4,), pool_after=(False,), dense_features=(), num_classes=7),
    dict(
        height=18,
        width=20,
        channels=3,
        features=(4, 6),
        kernel_size=(3, 5),
        pool_after=(True, False),
        pool_size=(3, 3),
        dense_features=(9,),
    ),
]


@pytest.mark.parametrize(
    "config", CNN_CONFIGS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items())
)
def test_cnn_configurations_parameter_count_and_shape(config):
    config = dict(config)
    shape = (2, config.pop("height", 28), config.pop("width", 28), config.pop("channels", 1))
    x = jax.ShapeDtypeStruct(shape, jnp.float32)
    model = CNN(**config)
    logits, variables = jax.eval_shape(model.init_with_output, jax.random.key(1), x)  # shapes only
    expected, flat = expected_cnn_params(*shape[1:], **config)
    assert _count(variables["params"]) == expected
    dense_kernels = [
        p["kernel"].shape for p in variables["params"].values() if p["kernel"].ndim == 2
    ]
    assert dense_kernels[0][0] == flat
    assert len(dense_kernels) == len(config.get("dense_features", (64,))) + 1
    chex.assert_shape(logits, (2, config.get("num_classes", 10)))


def test_cnn_same_padding_changes_flatten_size(seed_cnn):
    _, valid = seed_cnn
    x = jax.ShapeDtypeStruct((2, 28, 28, 1), jnp.float32)
    same = jax.eval_shape(CNN(padding="SAME").init, jax.random.key(0), x)["params"]
    # VALID: 28-26-13-11-5-3 -> 3*3*64; SAME: 28-28-14-14-7-7 -> 7*7*64
    assert valid["params"]["Dense_0"]["kernel"].shape == (576, 64)
    assert same["Dense_0"]["kernel"].shape == (7 * 7 * 64, 64)
    assert _count(same) == 320 + 18_496 + 36_928 + (3136 * 64 + 64) + 650 == 257_162


SMALL_CNN = dict(features=(4, 8), pool_after=(True, False), dense_features=(16,))


def _numpy_variables(module, x):
    """Variables in the structure ``module.init`` gives, drawn in numpy (kernels N(0, 1/fan_in),
    zero biases): eager ``init`` compiles every initialiser op per shape, and the tests using this
    are about the forward pass and its gradient, not about initial values."""
    shapes = jax.eval_shape(module.init, jax.random.key(1), x)
    rng = np.random.default_rng(1)

    def draw(path, leaf):
        if jax.tree_util.keystr(path).endswith("['bias']"):
            return jnp.zeros(leaf.shape, leaf.dtype)
        fan_in = int(np.prod(leaf.shape[:-1]))
        return jnp.asarray(rng.standard_normal(leaf.shape) / np.sqrt(fan_in), leaf.dtype)

    return jax.tree_util.tree_map_with_path(draw, shapes)


@pytest.fixture(scope="module")
def small_cnn():
    """(x [4, 12, 12, 1], variables of CNN(**SMALL_CNN)); dropout_rate does not change them."""
    x = _normal((4, 12, 12, 1))
    return x, _numpy_variables(CNN(**SMALL_CNN), x)


def test_cnn_dropout_only_with_train_and_rng(small_cnn):
    x, variables = small_cnn
    model = CNN(**SMALL_CNN, dropout_rate=0.5)
    apply = jax.jit(model.apply, static_argnames="train")
    eval_a = apply(variables, x)
    chex.assert_shape(eval_a, (4, 10))
    chex.assert_tree_all_finite(eval_a)
    eval_b = apply(variables, x, train=False, rngs={"dropout": jax.random.key(5)})
    np.testing.assert_array_equal(eval_a, eval_b)  # train=False is deterministic, ignores the rng
    train_a = apply(variables, x, train=True, rngs={"dropout": jax.random.key(2)})
    train_a2 = apply(variables, x, train=True, rngs={"dropout": jax.random.key(2)})
    train_b = apply(variables, x, train=True, rngs={"dropout": jax.random.key(3)})
    assert not np.allclose(train_a, eval_a)
    assert not np.allclose(train_a, train_b)
    np.testing.assert_array_equal(train_a, train_a2)
    # train=True without a 'dropout' rng is an error
    with pytest.raises(Exception, match="dropout"):
        model.apply(variables, x, train=True)


def test_cnn_dropout_before_output_layer():
    """With no hidden dense layers, the one dropout (before the output layer) still acts."""
    x = _normal((4, 8, 8, 1))
    model = CNN(features=(4,), pool_after=(True,), dense_features=(), dropout_rate=0.5)
    variables = _numpy_variables(model, x)
    apply = jax.jit(model.apply, static_argnames="train")
    out_train = apply(variables, x, train=True, rngs={"dropout": jax.random.key(2)})
    assert not np.allclose(out_train, apply(variables, x, train=False))


def test_cnn_rank3_input_raises_naming_expected_shape():
    with pytest.raises(
        ValueError, match=r"rank 4 \[batch, height, width, channels\].*\(2, 28, 28\)"
    ):
        CNN().init(jax.random.key(0), jnp.zeros((2, 28, 28)))


def test_cnn_integer_input_raises_naming_expected_shape():
    with pytest.raises(TypeError, match=r"floating.*\[batch, height, width, channels\].*int32"):
        CNN().init(jax.random.key(0), jnp.zeros((2, 28, 28, 1), jnp.int32))


@pytest.mark.parametrize("pool_after", [(True, True), (True, True, False, True)])
def test_cnn_pool_after_length_mismatch_raises_naming_lengths(pool_after):
    with pytest.raises(ValueError, match=rf"pool_after.*\(3\).*got {len(pool_after)}"):
        CNN(pool_after=pool_after).init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))


def _sgd(params, grads, lr):
    return jax.tree.map(lambda p, g: p - lr * g, params, grads)


def test_cnn_gradient_steps_reduce_cross_entropy(small_cnn):
    x, variables = small_cnn
    labels = jnp.array([0, 7, 1, 2])
    model, params = CNN(**SMALL_CNN), variables["params"]

    def loss_fn(params):
        logp = jax.nn.log_softmax(model.apply({"params": params}, x))
        return -jnp.mean(jnp.take_along_axis(logp, labels[:, None], axis=1))

    @jax.jit
    def step(params, lr):
        """(loss before, gradient, parameters after one SGD step)."""
        loss, grads = jax.value_and_grad(loss_fn)(params)
        return loss, grads, _sgd(params, grads, lr)

    loss0, grads, params1 = step(params, 0.05)
    chex.assert_tree_all_finite(grads)
    chex.assert_trees_all_equal_shapes(grads, params)
    for path, leaf in jax.tree_util.tree_leaves_with_path(grads):  # every layer gets a gradient
        assert float(np.abs(leaf).max()) > 0, jax.tree_util.keystr(path)
    loss1, _, _ = step(params1, 0.05)
    assert float(loss1) < float(loss0)
    for _ in range(40):  # a few more steps memorise the 4 examples
        loss, _, params = step(params, 0.1)
    assert float(loss) < 0.5 * float(loss0), (float(loss0), float(loss))


# ---------------------------------------------------------------------------------------------
# LSTM / SimpleRNN: parameters


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("num_layers,bidirectional", [(1, False), (2, False), (3, True)])
def test_recurrent_param_names_and_pinned_layout(cell, num_layers, bidirectional):
    cls, _, blocks = CELLS[cell]
    module = cls(HIDDEN, num_layers=num_layers, bidirectional=bidirectional)
    params = jax.eval_shape(module.init, jax.random.key(1), _xs())["params"]
    directions = 2 if bidirectional else 1
    suffixes = ("", "_reverse")[:directions]
    assert set(params) == {f"layer_{k}{s}" for k in range(num_layers) for s in suffixes}
    for name, layer in params.items():
        k = int(name.split("_")[1])
        features_in = FEATURES if k == 0 else directions * HIDDEN
        assert set(layer) == {"w_x", "w_h", "b"}
        assert layer["w_x"].shape == (features_in, blocks * HIDDEN), name
        assert layer["w_h"].shape == (HIDDEN, blocks * HIDDEN), name
        assert layer["b"].shape == (blocks * HIDDEN,), name
        assert all(p.dtype == jnp.float32 for p in layer.values())


@pytest.mark.parametrize("cell", CELLS)
def test_each_layer_and_direction_initialised_independently(cell):
    _, variables, _ = _built(cell, num_layers=2, bidirectional=True)
    w_h = [np.asarray(layer["w_h"]) for layer in variables["params"].values()]
    for a in range(len(w_h)):
        for b in range(a + 1, len(w_h)):
            assert not np.allclose(w_h[a], w_h[b])


@pytest.mark.parametrize("forget_bias", [None, 2.5])
def test_lstm_forget_bias_in_f_block(forget_bias):
    if forget_bias is None:  # the default
        params, value = _variables("lstm", 2, True)["params"], 1.0
    else:
        module = LSTM(HIDDEN, bidirectional=True, forget_bias=forget_bias)
        params = module.lazy_init(
            jax.random.key(1), jax.ShapeDtypeStruct(_xs().shape, jnp.float32)
        )["params"]
        value = forget_bias
    for name, layer in params.items():
        b = np.asarray(layer["b"]).reshape(4, HIDDEN)  # blocks i, f, g, o
        np.testing.assert_array_equal(b[1], np.full(HIDDEN, value), err_msg=name)
        np.testing.assert_array_equal(b[[0, 2, 3]], np.zeros((3, HIDDEN)), err_msg=name)


# ---------------------------------------------------------------------------------------------
# LSTM / SimpleRNN: outputs against the pinned scans and an independent reference


@pytest.mark.parametrize("cell", CELLS)
def test_single_layer_equals_pinned_scan_exactly(cell):
    module, variables, _ = _built(cell)
    xs = _xs()
    outputs, carry = module.apply(variables, xs)  # both eager
    ref_carry, ref_hs = CELLS[cell][1](variables["params"]["layer_0"], xs)
    np.testing.assert_array_equal(outputs, ref_hs)
    chex.assert_trees_all_equal(carry, _stack([ref_carry]))


@pytest.mark.parametrize("cell", CELLS)
def test_single_layer_matches_numpy_seed_equations(cell):
    _, variables, apply = _built(cell)
    xs = _xs()
    # a random bias, so that a mis-ordered gate block shows up
    params = {"layer_0": dict(variables["params"]["layer_0"])}
    params["layer_0"]["b"] = _normal(params["layer_0"]["b"].shape, 9)
    outputs, carry = apply({"params": params}, xs)
    ref_carry, ref_hs = np_recurrence(cell, params["layer_0"], xs)
    np.testing.assert_allclose(outputs, ref_hs, **REF)
    _leaves_close(carry, jax.tree.map(lambda a: a[None], ref_carry), **REF)


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("num_layers", [1, 2, 3])
@pytest.mark.parametrize("bidirectional", [False, True])
def test_output_and_final_carry_shapes(cell, num_layers, bidirectional):
    module = CELLS[cell][0](HIDDEN, num_layers=num_layers, bidirectional=bidirectional)
    xs = _xs()
    (outputs, carry), _ = jax.eval_shape(module.init_with_output, jax.random.key(1), xs)
    directions = 2 if bidirectional else 1
    chex.assert_shape(outputs, (BATCH, TIME, directions * HIDDEN))
    assert outputs.dtype == jnp.float32
    if cell == "lstm":
        assert isinstance(carry, tuple) and len(carry) == 2
        chex.assert_shape(list(carry), (num_layers * directions, BATCH, HIDDEN))
    else:
        chex.assert_shape(carry, (num_layers * directions, BATCH, HIDDEN))


@pytest.mark.parametrize("cell", CELLS)
def test_output_and_final_carry_shapes_concrete(cell):
    _, _, apply = _built(cell, num_layers=2, bidirectional=True)
    outputs, carry = apply(_built(cell, num_layers=2, bidirectional=True)[1], _xs())
    chex.assert_shape(outputs, (BATCH, TIME, 2 * HIDDEN))
    chex.assert_shape(jax.tree.leaves(carry), (4, BATCH, HIDDEN))
    chex.assert_tree_all_finite((outputs, carry))


@pytest.mark.parametrize("cell", CELLS)
def test_two_layers_equal_chained_scans(cell):
    _, variables, apply = _built(cell, num_layers=2)
    xs = _xs()
    outputs, carry = apply(variables, xs)
    ref_out, finals = _chain(cell, variables["params"], xs, 2, False)
    np.testing.assert_allclose(outputs, ref_out, **TIGHT)
    _leaves_close(carry, _stack(finals), **TIGHT)
    # and the second layer really reads the first layer's outputs
    assert not np.allclose(ref_out, _chain(cell, variables["params"], xs, 1, False)[0])


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("num_layers", [1, 2])
def test_bidirectional_equals_forward_and_reverse_scans_with_seq_lengths(cell, num_layers):
    _, variables, apply = _built(cell, num_layers=num_layers, bidirectional=True)
    xs, lengths = _xs(), jnp.array(LENGTHS)
    outputs, carry = apply(variables, xs, seq_lengths=lengths)
    ref_out, finals = _chain(cell, variables["params"], xs, num_layers, True, seq_lengths=lengths)
    np.testing.assert_allclose(outputs, ref_out, **TIGHT)
    _leaves_close(carry, _stack(finals), **TIGHT)
    if num_layers == 1:  # independent of lstm_scan: the numpy loop over each direction
        ref_out, ref_carry = np_chain(cell, variables["params"], xs, 1, True, LENGTHS)
        np.testing.assert_allclose(outputs, ref_out, **REF)
        _leaves_close(carry, ref_carry, **REF)


@pytest.mark.parametrize("cell", CELLS)
def test_stacked_bidirectional_with_seq_lengths_matches_numpy_seed_equations(cell):
    """Two bidirectional layers with packed sequences, against numpy loops alone: each sequence
    read forwards over its first l steps and backwards from step l-1, zeros after, final carry at
    the last real step."""
    _, variables, apply = _built(cell, num_layers=2, bidirectional=True)
    xs = _xs()
    outputs, carry = apply(variables, xs, seq_lengths=jnp.array(LENGTHS))
    ref_out, ref_carry = np_chain(cell, variables["params"], xs, 2, True, LENGTHS)
    np.testing.assert_allclose(outputs, ref_out, **REF)
    _leaves_close(carry, ref_carry, **REF)
    for n, length in enumerate(LENGTHS):
        np.testing.assert_array_equal(outputs[n, length:], 0)


@pytest.mark.parametrize("cell", CELLS)
def test_initial_carry_is_indexed_layer_times_directions_plus_direction(cell):
    _, variables, apply = _built(cell, num_layers=2, bidirectional=True)
    xs = _xs()
    h0 = _normal((4, BATCH, HIDDEN), 4)
    init = (h0, _normal((4, BATCH, HIDDEN), 5)) if cell == "lstm" else h0
    outputs, carry = apply(variables, xs, init)
    ref_out, finals = _chain(cell, variables["params"], xs, 2, True, initial_carry=init)
    np.testing.assert_allclose(outputs, ref_out, **TIGHT)
    _leaves_close(carry, _stack(finals), **TIGHT)
    assert not np.allclose(apply(variables, xs)[0], outputs)  # the initial carry matters


# ---------------------------------------------------------------------------------------------
# Dropout, dtypes, transforms, errors


@pytest.mark.parametrize("cell", CELLS)
def test_dropout_between_layers_only_with_train_and_rng(cell):
    _, variables, apply = _built(cell, num_layers=2, dropout_rate=0.5)
    xs = _xs()
    ref_out, finals = _chain(cell, variables["params"], xs, 2, False)
    # train=False: no dropout at all, even with an rng
    out_eval, _ = apply(variables, xs, rngs={"dropout": jax.random.key(3)})
    np.testing.assert_allclose(out_eval, ref_out, **TIGHT)
    # train=True: dropout acts, reproducibly for one rng, differently for another
    out_a, carry_a = apply(variables, xs, train=True, rngs={"dropout": jax.random.key(3)})
    out_a2, _ = apply(variables, xs, train=True, rngs={"dropout": jax.random.key(3)})
    out_b, _ = apply(variables, xs, train=True, rngs={"dropout": jax.random.key(4)})
    assert not np.allclose(out_a, ref_out)
    assert not np.allclose(out_a, out_b)
    np.testing.assert_array_equal(out_a, out_a2)
    # it acts *between* layers: not on the input, so the first layer's final carry is untouched
    _leaves_close(jax.tree.map(lambda a: a[0], carry_a), finals[0], **TIGHT)
    # a single layer has nothing between layers: train=True changes nothing
    _, v1, apply1 = _built(cell, num_layers=1, dropout_rate=0.5)
    np.testing.assert_array_equal(
        apply1(v1, xs, train=True, rngs={"dropout": jax.random.key(3)})[0],
        _built(cell)[2](v1, xs)[0],
    )
    with pytest.raises(Exception, match="dropout"):  # train=True needs a 'dropout' rng
        apply(variables, xs, train=True)


@pytest.mark.parametrize("cell", CELLS)
def test_bfloat16_computation_close_to_float32(cell):
    _, variables, apply32 = _built(cell, num_layers=2, bidirectional=True)
    module16, _v16, apply16 = _built(cell, num_layers=2, bidirectional=True, dtype=jnp.bfloat16)
    abstract = jax.eval_shape(module16.init, jax.random.key(1), _xs())  # param_dtype stays float32
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(abstract))
    xs = _xs()
    out32, carry32 = apply32(variables, xs)
    out16, carry16 = apply16(variables, xs)
    assert out16.dtype == jnp.bfloat16
    assert all(leaf.dtype == jnp.bfloat16 for leaf in jax.tree.leaves(carry16))
    _leaves_close((out16, carry16), (out32, carry32), atol=5e-2, rtol=5e-2)
    # reduced precision for real, not float32 cast at the end
    assert not np.array_equal(
        np.asarray(out16, np.float32), np.asarray(out32.astype(jnp.bfloat16), np.float32)
    )


@pytest.mark.parametrize("cell", CELLS)
def test_bfloat16_computation_with_float32_initial_carry(cell):
    """dtype is the computation dtype for every input: xs and the parameters are cast to it, and
    so should a float32 initial carry be (outputs and final carry in bfloat16, close to float32)."""
    _, variables, apply32 = _built(cell, num_layers=2, bidirectional=True)
    _, _, apply16 = _built(cell, num_layers=2, bidirectional=True, dtype=jnp.bfloat16)
    xs = _xs()
    h0 = 0.5 * _normal((4, BATCH, HIDDEN), 4)
    init = (h0, 0.5 * _normal((4, BATCH, HIDDEN), 5)) if cell == "lstm" else h0
    out32, carry32 = apply32(variables, xs, init)
    out16, carry16 = apply16(variables, xs, init)
    assert out16.dtype == jnp.bfloat16
    assert all(leaf.dtype == jnp.bfloat16 for leaf in jax.tree.leaves(carry16))
    _leaves_close((out16, carry16), (out32, carry32), atol=5e-2, rtol=5e-2)


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("param_dtype", [jnp.bfloat16])
def test_param_dtype_stored_and_computation_in_dtype(cell, param_dtype):
    """Parameters are created in param_dtype (checked abstractly) and cast to dtype to compute."""
    module = CELLS[cell][0](
        HIDDEN, num_layers=2, bidirectional=True, param_dtype=param_dtype, dtype=jnp.float32
    )
    xs = _xs()
    abstract = jax.eval_shape(module.init, jax.random.key(1), xs)
    assert all(leaf.dtype == param_dtype for leaf in jax.tree.leaves(abstract["params"]))
    # concrete low-precision parameters, made by casting float32 ones (see the test below for init)
    params = jax.tree.map(lambda a: a.astype(param_dtype), _variables(cell, 2, True)["params"])
    outputs, carry = jax.jit(module.apply)({"params": params}, xs)
    assert outputs.dtype == jnp.float32
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(carry))
    ref_out, _ = _chain(cell, jax.tree.map(lambda a: a.astype(jnp.float32), params), xs, 2, True)
    np.testing.assert_allclose(outputs, ref_out, **TIGHT)


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("param_dtype", [jnp.bfloat16])
def test_param_dtype_init_runs(cell, param_dtype):
    """module.init with a low-precision param_dtype gives concrete parameters of that dtype."""
    module = CELLS[cell][0](HIDDEN, param_dtype=param_dtype, dtype=jnp.float32)
    variables = module.init(jax.random.key(1), _xs())
    assert all(leaf.dtype == param_dtype for leaf in jax.tree.leaves(variables["params"]))
    chex.assert_tree_all_finite(jax.tree.map(lambda a: a.astype(jnp.float32), variables))


class ModuleVariantsTest(chex.TestCase):
    """The same module call with and without jit (chex variants), against the chained scans."""

    def _check(self, cell):
        module, variables, _ = _built(cell, num_layers=2, bidirectional=True)
        xs, lengths = _xs(), jnp.array(LENGTHS)
        ref_out, finals = _chain(cell, variables["params"], xs, 2, True, seq_lengths=lengths)

        @self.variant
        def run(variables, xs, lengths):
            return module.apply(variables, xs, seq_lengths=lengths)

        outputs, carry = run(variables, xs, lengths)
        np.testing.assert_allclose(outputs, ref_out, rtol=1e-5, atol=1e-6)
        _leaves_close(carry, _stack(finals), rtol=1e-5, atol=1e-6)

    @chex.variants(with_jit=True, without_jit=True)
    def test_lstm_jit_and_no_jit_agree(self):
        self._check("lstm")

    @chex.variants(with_jit=True, without_jit=True)
    def test_rnn_jit_and_no_jit_agree(self):
        self._check("rnn")


@pytest.mark.parametrize("cell", CELLS)
def test_gradients_match_autodiff_of_plain_scan(cell):
    """Gradients through the module (custom_vjp inside) vs JAX autodiff of a plain-scan chain,
    for parameters and inputs, with seq_lengths (an empty sequence included), both directions."""
    module, variables, _ = _built(cell, num_layers=1, bidirectional=True)
    xs, lengths = _xs(), jnp.array(LENGTHS)
    weights = _normal((BATCH, TIME, 2 * HIDDEN), 7)
    ref_scan = _autodiff_scan(cell)

    def loss(params, xs, use_module):
        if use_module:
            out, carry = module.apply({"params": params}, xs, seq_lengths=lengths)
        else:
            out, finals = _chain(cell, params, xs, 1, True, seq_lengths=lengths, scan=ref_scan)
            carry = _stack(finals)
        return jnp.sum(out * weights) + sum(jnp.sum(jnp.sin(c)) for c in jax.tree.leaves(carry))

    grad = jax.jit(jax.grad(loss, argnums=(0, 1)), static_argnums=2)
    g_mod, g_ref = grad(variables["params"], xs, True), grad(variables["params"], xs, False)
    chex.assert_tree_all_finite(g_mod)
    assert float(jnp.abs(g_ref[1]).max()) > 0
    _leaves_close(g_mod, g_ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("dtype", [jnp.int32, jnp.bool_])
def test_non_float_xs_raises_type_error(cell, dtype):
    with pytest.raises(TypeError, match=r"floating.*\[batch, time, features\]"):
        CELLS[cell][0](HIDDEN).init(jax.random.key(0), jnp.ones((BATCH, TIME, FEATURES), dtype))


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("shape", [(TIME, FEATURES), (BATCH, TIME, FEATURES, 1)])
def test_wrong_rank_xs_raises_value_error(cell, shape):
    with pytest.raises(
        ValueError, match=r"rank 3 \[batch, time, features\].*" + re.escape(str(shape))
    ):
        CELLS[cell][0](HIDDEN).init(jax.random.key(0), jnp.ones(shape))


def test_numpy_reference_is_sensitive_to_gate_order():
    """Guard on the reference itself: swapping the i and f blocks changes its output."""
    xs = _xs()
    params = jaxmodels.init_lstm(jax.random.key(0), FEATURES, HIDDEN, forget_bias=1.0)
    params = dict(params, b=_normal((4 * HIDDEN,), 1))
    perm = np.r_[HIDDEN : 2 * HIDDEN, 0:HIDDEN, 2 * HIDDEN : 4 * HIDDEN]
    swapped = {k: np.asarray(v)[..., perm] for k, v in params.items()}
    assert not np.allclose(
        np_recurrence("lstm", params, xs)[1], np_recurrence("lstm", swapped, xs)[1]
    )
