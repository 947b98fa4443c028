"""Input validation across the public API (``jaxmodels.nn.checks``): what is checked eagerly, with
errors naming the expected value and what was got; what under ``jax.jit`` is left to
``jaxmodels.checked`` (out-of-range ``seq_lengths`` and token ids); inputs made to work instead of
raising (mixed dtypes in the scans, nested lists, activation names).

Shapes are tiny and the jitted functions few: most checks raise before anything is compiled.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import checkify

import jaxmodels
from jaxmodels import CNN, LSTM, SimpleRNN, checked, get_model
from jaxmodels.nn.models import generate

BATCH, TIME, FEATURES, HIDDEN, VOCAB = 2, 5, 3, 4, 6
KEY = jax.random.key(0)
SCANS = {
    "lstm": (jaxmodels.lstm_scan, jaxmodels.init_lstm),
    "rnn": (jaxmodels.rnn_scan, jaxmodels.init_rnn),
}
MODULES = {"lstm": LSTM, "rnn": SimpleRNN}
CHAR = {"vocab_size": VOCAB, "embed_size": 3, "hidden_size": HIDDEN, "num_layers": 1}


def _xs(dtype=jnp.float32, shape=(BATCH, TIME, FEATURES)):
    return jnp.asarray(np.random.default_rng(0).standard_normal(shape), dtype)


def _params(cell, dtype=jnp.float32):
    return jax.tree.map(lambda p: p.astype(dtype), SCANS[cell][1](KEY, FEATURES, HIDDEN))


def _tokens(first=0):
    """[BATCH, TIME] token ids, the first one ``first`` and the rest in the vocabulary."""
    tokens = np.arange(BATCH * TIME).reshape(BATCH, TIME) % VOCAB
    tokens[0, 0] = first
    return jnp.asarray(tokens, jnp.int32)


def _close(a, b, tol=1e-6):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert x.shape == y.shape and x.dtype == y.dtype, (x.shape, x.dtype, y.shape, y.dtype)
        np.testing.assert_allclose(np.asarray(x, np.float32), np.asarray(y, np.float32), atol=tol)


# ---------------------------------------------------------------------------------------------
# Mixed dtypes: the scans compute in the promoted dtype (case 1)


@pytest.mark.parametrize("cell", SCANS)
def test_scan_runs_bfloat16_xs_with_float32_params_in_float32(cell):
    scan = SCANS[cell][0]
    params, xs16 = _params(cell), _xs(jnp.bfloat16)
    mixed = jax.jit(scan)(params, xs16)
    _close(mixed, jax.jit(scan)(params, xs16.astype(jnp.float32)))
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(mixed))

    loss = lambda p, x: jnp.sum(scan(p, x)[1])
    grads = jax.jit(jax.grad(loss, argnums=(0, 1)))(params, xs16)
    assert grads[1].dtype == jnp.bfloat16
    assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(grads[0]))
    _close(grads[0], jax.grad(loss)(params, xs16.astype(jnp.float32)), tol=1e-5)


def test_scan_runs_float32_xs_with_bfloat16_params_through_the_gradient():
    params16 = _params("lstm", jnp.bfloat16)
    loss = lambda p, x: jnp.sum(jaxmodels.lstm_scan(p, x)[1])
    grads = jax.jit(jax.grad(loss))(params16, _xs())
    assert all(g.dtype == jnp.bfloat16 for g in jax.tree.leaves(grads))


def test_scan_casts_initial_carry_to_the_computation_dtype():
    params16, xs16 = _params("lstm", jnp.bfloat16), _xs(jnp.bfloat16)
    carry = (jnp.full((BATCH, HIDDEN), 0.5), jnp.full((BATCH, HIDDEN), -0.25))
    out = jax.jit(jaxmodels.lstm_scan)(params16, xs16, carry)
    assert all(leaf.dtype == jnp.bfloat16 for leaf in jax.tree.leaves(out))
    carry16 = tuple(c.astype(jnp.bfloat16) for c in carry)
    _close(out, jax.jit(jaxmodels.lstm_scan)(params16, xs16, carry16), tol=0)


# ---------------------------------------------------------------------------------------------
# Nested lists are converted (case 2)


@pytest.mark.parametrize("cell", SCANS)
def test_scans_and_modules_take_nested_lists(cell):
    scan, params, xs = SCANS[cell][0], _params(cell), _xs()
    _close(scan(params, xs.tolist()), scan(params, xs))
    module = MODULES[cell](HIDDEN)
    variables = module.init(KEY, xs.tolist())
    _close(module.apply(variables, xs.tolist()), module.apply(variables, xs))


def test_cells_take_nested_lists():
    x = _xs()[:, 0]
    params = _params("lstm")
    carry = (jnp.zeros((BATCH, HIDDEN)), jnp.zeros((BATCH, HIDDEN)))
    _close(jaxmodels.lstm_cell(params, carry, x.tolist()), jaxmodels.lstm_cell(params, carry, x))
    rnn = _params("rnn")
    h = jnp.zeros((BATCH, HIDDEN))
    _close(jaxmodels.rnn_cell(rnn, h, x.tolist()), jaxmodels.rnn_cell(rnn, h, x))
    dense = jaxmodels.init_dense(KEY, FEATURES, 2)
    _close(jaxmodels.dense(dense, x.tolist()), jaxmodels.dense(dense, x))


def test_models_take_nested_lists():
    cnn = CNN(features=(2,), pool_after=(False,), dense_features=(), num_classes=3)
    images = jnp.ones((1, 4, 4, 1))
    variables = cnn.init(KEY, images)
    _close(cnn.apply(variables, images.tolist()), cnn.apply(variables, images))
    model = get_model("char-lstm", **CHAR)
    variables = model.init(KEY, _tokens())
    _close(model.apply(variables, _tokens().tolist()), model.apply(variables, _tokens()))


# ---------------------------------------------------------------------------------------------
# Empty axes (case 3), sizes (case 4), activations (case 5), rates (case 7), shapes and configs


@pytest.mark.parametrize("cell", SCANS)
@pytest.mark.parametrize(
    "shape,match",
    [
        ((BATCH, 0, FEATURES), r"at least one time step, got xs of shape \(2, 0, 3\)"),
        ((0, TIME, FEATURES), r"at least one sequence \(batch >= 1\), got xs of shape \(0, 5, 3\)"),
    ],
    ids=["time0", "batch0"],
)
def test_empty_time_or_batch_raises(cell, shape, match):
    with pytest.raises(ValueError, match=match):
        SCANS[cell][0](_params(cell), jnp.zeros(shape))
    with pytest.raises(ValueError, match=match):
        MODULES[cell](HIDDEN).init(KEY, jnp.zeros(shape))


def test_empty_tokens_and_images_raise():
    with pytest.raises(ValueError, match=r"at least one sequence and one time step.*\(2, 0\)"):
        get_model("char-rnn", **CHAR).init(KEY, jnp.zeros((BATCH, 0), jnp.int32))
    with pytest.raises(ValueError, match=r"at least one image.*\(0, 28, 28, 1\)"):
        CNN().init(KEY, jnp.zeros((0, 28, 28, 1)))


@pytest.mark.parametrize(
    "init,args,exc,match",
    [
        (jaxmodels.init_lstm, (FEATURES, 0), ValueError, r"hidden to be an integer >= 1, got 0"),
        (jaxmodels.init_lstm, (FEATURES, -3), ValueError, r"hidden .*>= 1, got -3"),
        (jaxmodels.init_lstm, (FEATURES, 2.5), TypeError, r"hidden .*integer >= 1, got 2.5"),
        (jaxmodels.init_lstm, (FEATURES, True), TypeError, r"hidden .*integer >= 1, got True"),
        (jaxmodels.init_lstm, (0, HIDDEN), ValueError, r"features .*>= 1, got 0"),
        (jaxmodels.init_rnn, (FEATURES, 0), ValueError, r"hidden .*>= 1, got 0"),
        (jaxmodels.init_rnn, (FEATURES, "4"), TypeError, r"hidden .*integer >= 1, got '4'"),
        (jaxmodels.init_dense, (FEATURES, 0), ValueError, r"out .*>= 1, got 0"),
        (jaxmodels.init_dense, (-2, 3), ValueError, r"features .*>= 1, got -2"),
    ],
)
def test_initialisers_reject_bad_sizes(init, args, exc, match):
    with pytest.raises(exc, match=match):
        init(KEY, *args)


def test_initialisers_take_numpy_integers():
    params = jaxmodels.init_lstm(KEY, np.int64(FEATURES), np.int32(HIDDEN))
    assert params["w_h"].shape == (HIDDEN, 4 * HIDDEN)


@pytest.mark.parametrize("name,f", [("relu", jax.nn.relu), ("sigmoid", jax.nn.sigmoid)])
def test_activation_names_are_accepted(name, f):
    params, xs = _params("rnn"), _xs()
    _close(
        jaxmodels.rnn_scan(params, xs, activation=name),
        jaxmodels.rnn_scan(params, xs, activation=f),
    )
    module = SimpleRNN(HIDDEN, activation=name)
    variables = module.init(KEY, xs)
    _close(module.apply(variables, xs), module.clone(activation=f).apply(variables, xs))
    x, h = xs[:, 0], jnp.ones((BATCH, HIDDEN))
    _close(jaxmodels.rnn_cell(params, h, x, activation=name), jaxmodels.rnn_cell(params, h, x, f))
    dense = jaxmodels.init_dense(KEY, FEATURES, 2)
    _close(jaxmodels.dense(dense, x, name), jaxmodels.dense(dense, x, f))


@pytest.mark.parametrize("activation,exc", [("softsign", ValueError), (3, TypeError)])
def test_unknown_activation_raises_listing_the_names(activation, exc):
    match = r"activation to be a callable or one of \('identity', 'relu', 'tanh', 'sigmoid'\)"
    with pytest.raises(exc, match=match + ".*" + re.escape(repr(activation))):
        jaxmodels.rnn_scan(_params("rnn"), _xs(), activation=activation)
    with pytest.raises(exc, match=match):
        SimpleRNN(HIDDEN, activation=activation).init(KEY, _xs())
    with pytest.raises(exc, match=match):
        jaxmodels.dense(jaxmodels.init_dense(KEY, FEATURES, 2), _xs()[:, 0], activation)


def _dropout_builders():
    """name -> (rate -> a call that builds the model and runs it with train=True)."""
    rngs = {"params": KEY, "dropout": KEY}
    xs, images = _xs(), jnp.ones((1, 28, 28, 1))

    def model(name, example, **config):
        def run(rate):
            m = get_model(name, dropout_rate=rate, **config)
            return m.apply(m.init(KEY, example), example, train=True, rng=KEY)

        return run

    return {
        "LSTM": lambda r: LSTM(HIDDEN, num_layers=2, dropout_rate=r).init(rngs, xs, train=True),
        "SimpleRNN": lambda r: SimpleRNN(HIDDEN, num_layers=2, dropout_rate=r).init(
            rngs, xs, train=True
        ),
        "CNN": lambda r: CNN(dropout_rate=r).init(rngs, images, train=True),
        "lstm-classifier": model("lstm-classifier", xs, hidden_size=HIDDEN),
        "char-rnn": model("char-rnn", _tokens(), **CHAR),
    }


@pytest.mark.parametrize("builder", list(_dropout_builders()))
@pytest.mark.parametrize(
    "rate,exc",
    [(1.5, ValueError), (-0.1, ValueError), (float("nan"), ValueError), ("0.1", TypeError)],
)
def test_dropout_rate_outside_zero_one_raises(builder, rate, exc):
    with pytest.raises(exc, match=r"dropout_rate.*\[0, 1\].*" + re.escape(repr(rate))):
        _dropout_builders()[builder](rate)


def test_dropout_rate_one_is_accepted():
    out, _ = LSTM(HIDDEN, num_layers=2, dropout_rate=1.0).init_with_output(
        {"params": KEY, "dropout": KEY}, _xs(), train=True
    )
    assert out[0].shape == (BATCH, TIME, HIDDEN)


def _config_case(id, build, exc, match, example="xs"):
    return pytest.param(build, exc, match, example, id=id)


@pytest.mark.parametrize(
    "build,exc,match,example",
    [
        _config_case(
            "LSTM-layers",
            lambda: LSTM(HIDDEN, num_layers=0),
            ValueError,
            r"num_layers .*>= 1, got 0",
        ),
        _config_case("LSTM-hidden", lambda: LSTM(-1), ValueError, r"hidden_size .*>= 1, got -1"),
        _config_case(
            "RNN-hidden", lambda: SimpleRNN(2.5), TypeError, r"hidden_size .*integer >= 1, got 2.5"
        ),
        _config_case(
            "classifier-classes",
            lambda: get_model("lstm-classifier", num_classes=0).module,
            ValueError,
            r"num_outputs \(num_classes of a classifier\) .*>= 1, got 0",
        ),
        _config_case(
            "regressor-hidden",
            lambda: get_model("rnn-regressor", hidden_size=0).module,
            ValueError,
            r"hidden_size .*got 0",
        ),
        _config_case(
            "char-vocab",
            lambda: get_model("char-lstm", vocab_size=0).module,
            ValueError,
            r"vocab_size .*got 0",
            "tokens",
        ),
        _config_case(
            "char-embed",
            lambda: get_model("char-lstm", vocab_size=VOCAB, embed_size=-1).module,
            ValueError,
            r"embed_size .*got -1",
            "tokens",
        ),
        _config_case(
            "char-layers",
            lambda: get_model("char-rnn", vocab_size=VOCAB, num_layers=0).module,
            ValueError,
            r"num_layers .*got 0",
            "tokens",
        ),
        _config_case(
            "cnn-classes",
            lambda: get_model("cnn", num_classes=0).module,
            ValueError,
            r"num_classes .*got 0",
            "images",
        ),
        _config_case(
            "cnn-features",
            lambda: CNN(features=(32, 0, 64)),
            ValueError,
            r"features\[1\] .*got 0",
            "images",
        ),
        _config_case(
            "cnn-dense",
            lambda: CNN(dense_features=(0,)),
            ValueError,
            r"dense_features\[0\] .*got 0",
            "images",
        ),
        _config_case(
            "cnn-kernel",
            lambda: CNN(kernel_size=(3, 0)),
            ValueError,
            r"kernel_size\[1\] .*got 0",
            "images",
        ),
        _config_case(
            "cnn-kernel-int",
            lambda: CNN(kernel_size=3),
            ValueError,
            r"kernel_size to be \(height, width\), got 3",
            "images",
        ),
        _config_case(
            "cnn-pool",
            lambda: CNN(pool_size=(0, 2)),
            ValueError,
            r"pool_size\[0\] .*got 0",
            "images",
        ),
    ],
)
def test_bad_module_configuration_raises_naming_it(build, exc, match, example):
    examples = {"xs": _xs(), "tokens": _tokens(), "images": jnp.ones((1, 28, 28, 1))}
    with pytest.raises(exc, match=match):
        build().init(KEY, examples[example])


@pytest.mark.parametrize("conv_impl", ["patches", "xla"])
def test_cnn_image_smaller_than_its_convolutions_raises_naming_the_least_size(conv_impl):
    with pytest.raises(
        ValueError,
        match=r"at least 18x18 pixels for 3 3x3 VALID convolutions and 2 2x2 max-pools, "
        r"got shape \(1, 17, 28, 1\)",
    ):
        CNN(conv_impl=conv_impl).init(KEY, jnp.ones((1, 17, 28, 1)))
    CNN(conv_impl=conv_impl).init(KEY, jnp.ones((1, 18, 18, 1)))  # the least size fits
    with pytest.raises(
        ValueError,
        match=r"at least 4x4 pixels for 1 3x3 SAME convolutions and 1 4x4 max-pools, got shape \(1, 3, 8, 1\)",
    ):
        CNN(
            features=(2,), pool_after=(True,), pool_size=(4, 4), padding="SAME", conv_impl=conv_impl
        ).init(KEY, jnp.ones((1, 3, 8, 1)))


def test_cnn_input_not_the_one_its_parameters_were_made_for_raises():
    cnn = CNN()
    variables = cnn.init(KEY, jnp.ones((1, 28, 28, 1)))
    with pytest.raises(
        ValueError, match=r"channels=1\] as Conv_0's kernel \(3, 3, 1, 32\).*\(1, 28, 28, 3\)"
    ):
        cnn.apply(variables, jnp.ones((1, 28, 28, 3)))
    with pytest.raises(
        ValueError, match=r"Dense_0 reads 576 features.*\(1, 32, 32, 1\), which gives 1024"
    ):
        cnn.apply(variables, jnp.ones((1, 32, 32, 1)))


@pytest.mark.parametrize("name", ["lstm-classifier", "rnn-regressor"])
def test_module_xs_features_not_those_of_its_parameters_raises_naming_both(name):
    model = get_model(name, hidden_size=HIDDEN)
    variables = model.init(KEY, _xs())
    with pytest.raises(
        ValueError,
        match=r"features=3\] as layer_0's w_x \(3, \d+\) was made for, got shape \(2, 5, 4\)",
    ):
        model.apply(variables, _xs(shape=(BATCH, TIME, FEATURES + 1)))


@pytest.mark.parametrize(
    "call,match",
    [
        (
            lambda p, c: jaxmodels.lstm_cell(p, c, jnp.zeros((FEATURES,))),
            r"x of rank 2 \[batch, features\], got shape \(3,\)",
        ),
        (
            lambda p, c: jaxmodels.lstm_cell(
                p, (c[0], jnp.zeros((BATCH, HIDDEN + 1))), jnp.zeros((BATCH, FEATURES))
            ),
            r"carry c of shape \[batch, hidden\]=\(2, 4\), got shape \(2, 5\)",
        ),
        (
            lambda p, c: jaxmodels.lstm_cell(p, c[0], jnp.zeros((BATCH, FEATURES))),
            r"carry to be a pair \(h, c\)",
        ),
        (
            lambda p, c: jaxmodels.lstm_scan(p, _xs(), unroll=0),
            r"unroll to be an integer >= 1, got 0",
        ),
        (
            lambda p, c: jaxmodels.lstm_scan(
                {"w_x": p["w_x"][:, :0], "w_h": p["w_h"][:0, :0], "b": p["b"][:0]}, _xs()
            ),
            r"hidden >= 1.*w_h \(0, 0\)",
        ),
    ],
    ids=["x_rank", "carry_shape", "carry_not_pair", "unroll", "hidden0"],
)
def test_bad_step_and_scan_arguments_raise(call, match):
    carry = (jnp.zeros((BATCH, HIDDEN)), jnp.zeros((BATCH, HIDDEN)))
    with pytest.raises(ValueError, match=match):
        call(_params("lstm"), carry)


# ---------------------------------------------------------------------------------------------
# Values: eagerly when concrete, under jit with jaxmodels.checked (cases 6 and 8)


def test_seq_lengths_out_of_range_raise_eagerly_in_the_module():
    module = LSTM(HIDDEN)
    with pytest.raises(ValueError, match=r"seq_lengths in \[0, time=5\], got values from 2 to 7"):
        module.init(KEY, _xs(), seq_lengths=jnp.asarray([7, 2]))


@pytest.mark.parametrize("cell", SCANS)
def test_seq_lengths_out_of_range_act_clamped_under_jit(cell):
    """The documented behaviour without ``checked``: nothing raises, lengths act as clamped."""
    scan, params = SCANS[cell][0], _params(cell)
    run = jax.jit(lambda n: scan(params, _xs(), seq_lengths=n))
    _close(run(jnp.asarray([TIME + 3, -2])), run(jnp.asarray([TIME, 0])), tol=0)


@pytest.mark.parametrize("cell", SCANS)
@pytest.mark.parametrize("lengths,low,high", [((7, 2), 2, 7), ((3, -1), -1, 3)])
def test_checked_catches_seq_lengths_out_of_range_under_jit(cell, lengths, low, high):
    scan, params = SCANS[cell][0], _params(cell)
    run = checked(lambda p, x, n: scan(p, x, seq_lengths=n))
    valid = jnp.asarray([TIME, 2])
    _close(run(params, _xs(), valid), scan(params, _xs(), seq_lengths=valid), tol=1e-5)
    message = rf"seq_lengths in \[0, time=5\], got values from {low} to {high}"
    with pytest.raises(ValueError, match=message) as info:
        run(params, _xs(), jnp.asarray(lengths))
    assert isinstance(info.value, checkify.JaxRuntimeError)
    loss = checked(jax.grad(lambda p, x, n: jnp.sum(scan(p, x, seq_lengths=n)[1])))
    with pytest.raises(ValueError, match=message):
        loss(params, _xs(), jnp.asarray(lengths))


def test_checked_catches_seq_lengths_through_a_module():
    module = LSTM(HIDDEN, bidirectional=True)
    variables = module.init(KEY, _xs())
    with pytest.raises(ValueError, match=r"seq_lengths in \[0, time=5\], got values from 2 to 9"):
        checked(module.apply)(variables, _xs(), seq_lengths=jnp.asarray([9, 2]))


@pytest.mark.parametrize("name", ["char-lstm", "char-rnn"])
@pytest.mark.parametrize("first,low,high", [(VOCAB, 0, VOCAB), (-1, -1, VOCAB - 1)])
def test_token_ids_outside_the_vocabulary(name, first, low, high):
    model = get_model(name, **CHAR)
    variables = model.init(KEY, _tokens())
    message = rf"tokens in \[0, vocab_size=6\), got values from {low} to {high}"
    with pytest.raises(ValueError, match=message):
        model.apply(variables, _tokens(first))
    # under jit alone they cannot be seen: the documented NaN logits, or for a negative id the
    # table read from its end
    logits = jax.jit(model.apply)(variables, _tokens(first))
    if first >= VOCAB:
        assert np.isnan(np.asarray(logits)).any()
    else:
        _close(logits, jax.jit(model.apply)(variables, _tokens(first % VOCAB)), tol=0)
    apply = checked(model.apply, static_argnames="train")
    assert np.isfinite(np.asarray(apply(variables, _tokens(), train=True, rng=KEY))).all()
    with pytest.raises(ValueError, match=message):
        apply(variables, _tokens(first), train=True, rng=KEY)


def test_generate_checks_the_prompt_against_the_vocabulary():
    model = get_model("char-lstm", **CHAR)
    variables = model.init(KEY, _tokens())
    message = r"prompt tokens in \[0, vocab_size=6\), got values from 1 to 9"
    with pytest.raises(ValueError, match=message):
        generate(model, variables, jnp.asarray([[1, 9]]), 3, KEY)
    sample = checked(lambda v, prompt, key: generate(model, v, prompt, 3, key))
    assert sample(variables, jnp.asarray([[1, 2]]), KEY).shape == (1, 3)
    with pytest.raises(ValueError, match=message):
        sample(variables, jnp.asarray([[1, 9]]), KEY)


def test_traced_value_checks_compile_to_nothing():
    """Without checkify, the traced token check (a min and a max over the token ids, which the
    embedding only gathers with) is in the lowered program and gone from the compiled one."""
    model = get_model("char-lstm", **CHAR)
    variables = model.init(KEY, _tokens())
    lowered = jax.jit(model.apply).lower(variables, _tokens())
    stablehlo = f"tensor<{BATCH}x{TIME}xi32>"
    assert [
        line for line in lowered.as_text().splitlines() if "reduce" in line and stablehlo in line
    ]
    hlo = f"s32[{BATCH},{TIME}]"
    compiled = lowered.compile().as_text()
    assert not [line for line in compiled.splitlines() if "reduce(" in line and hlo in line]
