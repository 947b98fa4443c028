"""Tests of the model registry in ``jaxmodels.nn.models``: ``get_model``, ``list_models``, ``Model``.

Every registered model is built with a small configuration, initialised and applied on a suitable
example; the sequence models are checked against their parts run by hand (the recurrent module and
the dense head) and against packed-sequence semantics; ``apply`` is used under jit and grad.
"""

from __future__ import annotations

import dataclasses
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _oracles import np_chain, np_dense

import jaxmodels
from jaxmodels import get_model, list_models
from jaxmodels.nn.models import TASKS, Model, generate

BATCH, TIME, FEATURES, HIDDEN, VOCAB = 3, 6, 4, 8, 11
LENGTHS = (TIME, 4, 1)

EXPECTED_TASKS = {
    "cnn": "classification",
    "lstm-classifier": "classification",
    "rnn-classifier": "classification",
    "lstm-regressor": "regression",
    "rnn-regressor": "regression",
    "char-lstm": "language_model",
    "char-rnn": "language_model",
}
SEQUENCE_MODELS = ("lstm-classifier", "rnn-classifier", "lstm-regressor", "rnn-regressor")

# name -> (small config, expected output shape)
CONFIGS = {
    "cnn": ({}, (2, 10)),
    "lstm-classifier": ({"hidden_size": HIDDEN, "num_classes": 5}, (BATCH, 5)),
    "rnn-classifier": ({"hidden_size": HIDDEN}, (BATCH, 10)),
    "lstm-regressor": ({"hidden_size": HIDDEN}, (BATCH, 1)),
    "rnn-regressor": ({"hidden_size": HIDDEN, "num_outputs": 2}, (BATCH, 2)),
    "char-lstm": (
        {"vocab_size": VOCAB, "embed_size": 4, "hidden_size": HIDDEN, "num_layers": 1},
        (BATCH, TIME, VOCAB),
    ),
    "char-rnn": (
        {"vocab_size": VOCAB, "embed_size": 4, "hidden_size": HIDDEN, "num_layers": 2},
        (BATCH, TIME, VOCAB),
    ),
}
CHAR_MODELS = ("char-lstm", "char-rnn")


def _example(name: str, seed: int = 0):
    """A suitable input for ``name`` (numpy random: no per-shape compilation)."""
    rng = np.random.default_rng(seed)
    if name == "cnn":
        return jnp.asarray(rng.standard_normal((2, 28, 28, 1)), jnp.float32)
    if name in CHAR_MODELS:
        return jnp.asarray(rng.integers(0, VOCAB, (BATCH, TIME)), jnp.int32)
    return jnp.asarray(rng.standard_normal((BATCH, TIME, FEATURES)), jnp.float32)


def _config(name: str, **extra) -> dict:
    return {**CONFIGS[name][0], **extra}


@functools.cache
def _model(name: str, **extra):
    """(model, jitted apply) for ``name`` with its small config plus ``extra``."""
    model = get_model(name, **_config(name, **extra))
    return model, jax.jit(model.apply, static_argnames=("train",))


@functools.cache
def _variables(name: str, **extra):
    """``model.init`` under jit (one compilation instead of one per initialiser op and shape; the
    eager call is checked against it in test_init_depends_only_on_key)."""
    return jax.jit(_model(name, **extra)[0].init)(jax.random.key(1), _example(name))


def _built(name: str, dropout_rate: float | None = None, **extra):
    """(model, variables, jitted apply); ``dropout_rate`` does not change the parameters, so models
    that differ only in it share them."""
    model, apply = (
        _model(name, **extra)
        if dropout_rate is None
        else _model(name, dropout_rate=dropout_rate, **extra)
    )
    return model, _variables(name, **extra), apply


REF = dict(rtol=1e-5, atol=1e-5)  # float32 model vs float64 numpy reference


def np_sequence_model(cell, params, xs, num_layers, bidirectional, lengths=None):
    """SequenceModel by hand: the stacked numpy recurrences of tests/_oracles.py, then the dense
    head on the last layer's final h (forward and backward concatenated)."""
    encoder = params["LSTM_0" if cell == "lstm" else "SimpleRNN_0"]
    _, carry = np_chain(cell, encoder, xs, num_layers, bidirectional, lengths)
    h_n = carry[0] if cell == "lstm" else carry  # [layers * directions, batch, hidden]
    last = np.concatenate(list(h_n[-(2 if bidirectional else 1) :]), -1)
    head = params["Dense_0"]
    return np_dense(
        np.asarray(head["kernel"], np.float64), np.asarray(head["bias"], np.float64), last
    )


def _count(tree) -> int:
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree))


# ---------------------------------------------------------------------------------------------
# The registry


def test_list_models_names():
    names = list_models()
    assert isinstance(names, tuple)
    assert len(names) == len(set(names))
    assert set(names) == set(EXPECTED_TASKS)


@pytest.mark.parametrize("name", list(EXPECTED_TASKS))
def test_task_values(name):
    model = get_model(name, **_config(name))
    assert isinstance(model, Model)
    assert model.name == name
    assert model.task == EXPECTED_TASKS[name]
    assert model.task in TASKS


def test_unknown_model_name_raises_listing_known_names():
    with pytest.raises(ValueError, match="no-such-model") as info:
        get_model("no-such-model")
    for name in list_models():
        assert name in str(info.value)


@pytest.mark.parametrize("name", list(EXPECTED_TASKS))
def test_bad_config_kwarg_raises_type_error_naming_model(name):
    with pytest.raises(TypeError, match=rf"'{name}'.*not_a_field|not_a_field.*'{name}'"):
        get_model(name, **_config(name), not_a_field=3)


def test_char_lstm_without_vocab_size_raises_type_error_naming_model():
    with pytest.raises(TypeError, match=r"'char-lstm'.*vocab_size"):
        get_model("char-lstm")


def test_models_are_immutable_values():
    model = get_model("rnn-regressor", hidden_size=4)
    with pytest.raises(dataclasses.FrozenInstanceError):
        model.task = "classification"
    assert get_model("rnn-regressor", hidden_size=4) == model


# ---------------------------------------------------------------------------------------------
# Every model initialises and applies


@pytest.mark.parametrize("name", list(EXPECTED_TASKS))
def test_init_and_apply_output_shape(name):
    _, variables, apply = _built(name)
    assert set(variables) == {"params"}
    x = _example(name, seed=2)
    out = apply(variables, x)
    chex.assert_shape(out, CONFIGS[name][1])
    assert out.dtype == jnp.float32
    chex.assert_tree_all_finite(out)
    assert not np.allclose(out[0], out[1])  # depends on the input


@pytest.mark.parametrize("name", SEQUENCE_MODELS)
def test_sequence_models_with_and_without_seq_lengths(name):
    model, variables, apply = _built(name)
    xs, lengths = _example(name, seed=2), jnp.array(LENGTHS)
    # init takes the kwarg too, for the same parameters (checked abstractly: shapes and dtypes)
    chex.assert_trees_all_equal_shapes_and_dtypes(
        jax.eval_shape(model.init, jax.random.key(1), _example(name), seq_lengths=lengths),
        variables,
    )
    full = apply(variables, xs)
    out = apply(variables, xs, seq_lengths=lengths)
    chex.assert_shape(out, CONFIGS[name][1])
    cell = name.split("-")[0]
    np.testing.assert_allclose(
        full, np_sequence_model(cell, variables["params"], xs, 1, False), **REF
    )
    np.testing.assert_allclose(
        out, np_sequence_model(cell, variables["params"], xs, 1, False, LENGTHS), **REF
    )
    # a full-length sequence is unaffected; shorter ones change
    np.testing.assert_allclose(out[0], full[0], rtol=1e-5, atol=1e-6)
    assert not np.allclose(out[1:], full[1:])


@pytest.mark.parametrize("cell,bidirectional", [("lstm", True), ("rnn", False)])
def test_sequence_head_reads_last_layer_final_states(cell, bidirectional):
    """logits = concat(final h of the last layer's directions) @ W + b, against numpy loops."""
    name = f"{cell}-classifier"
    _, variables, apply = _built(name, num_layers=2, bidirectional=bidirectional)
    xs = _example(name, seed=2)
    for lengths in (None, LENGTHS):
        logits = (
            apply(variables, xs)
            if lengths is None
            else apply(variables, xs, seq_lengths=jnp.array(lengths))
        )
        expected = np_sequence_model(cell, variables["params"], xs, 2, bidirectional, lengths)
        np.testing.assert_allclose(logits, expected, **REF)


@pytest.mark.parametrize("name", CHAR_MODELS)
def test_char_models_are_causal(name):
    """Logits at step t depend on tokens up to t only."""
    _, variables, apply = _built(name)
    tokens = _example(name, seed=2)
    changed = tokens.at[:, 3].set((tokens[:, 3] + 1) % VOCAB)
    a, b = apply(variables, tokens), apply(variables, changed)
    np.testing.assert_array_equal(a[:, :3], b[:, :3])
    assert not np.allclose(a[:, 3:], b[:, 3:])


@pytest.mark.parametrize("name", CHAR_MODELS)
def test_char_models_read_a_text_in_pieces(name):
    """return_carry / initial_carry: two calls over the halves give the logits of one call."""
    model, variables, apply = _built(name)
    tokens = _example(name, seed=4)
    first, carry = model.apply(variables, tokens[:, :2], return_carry=True)
    second = model.apply(variables, tokens[:, 2:], initial_carry=carry)
    np.testing.assert_allclose(
        jnp.concatenate([first, second], axis=1), apply(variables, tokens), rtol=1e-5, atol=1e-6
    )


@pytest.mark.parametrize("name", CHAR_MODELS)
def test_generate_greedy_follows_the_models_own_argmax(name):
    """temperature 0: each generated token is the argmax of the logits after prompt + the tokens
    before it, computed here by re-reading the whole text every time."""
    model, variables, apply = _built(name)
    prompt = _example(name, seed=5)[:, :3]
    out = generate(model, variables, prompt, 4, jax.random.key(0), temperature=0)
    chex.assert_shape(out, (BATCH, 4))
    assert out.dtype == jnp.int32
    text = prompt
    for t in range(4):
        np.testing.assert_array_equal(out[:, t], jnp.argmax(apply(variables, text)[:, -1], axis=-1))
        text = jnp.concatenate([text, out[:, t : t + 1]], axis=1)


def test_generate_samples_by_key_and_checks_its_arguments():
    model, variables, _ = _built("char-lstm")
    prompt = _example("char-lstm")[:, :2]
    a = generate(model, variables, prompt, 30, jax.random.key(1))
    np.testing.assert_array_equal(a, generate(model, variables, prompt, 30, jax.random.key(1)))
    assert not np.array_equal(a, generate(model, variables, prompt, 30, jax.random.key(2)))
    assert int(a.min()) >= 0 and int(a.max()) < VOCAB
    with pytest.raises(ValueError, match="language model"):
        generate(_built("rnn-regressor")[0], {}, prompt, 3, jax.random.key(0))
    with pytest.raises(ValueError, match=r"integer prompt \[batch, p\]"):
        generate(model, variables, prompt[0], 3, jax.random.key(0))
    with pytest.raises(ValueError, match="positive integer length"):
        generate(model, variables, prompt, 0, jax.random.key(0))
    with pytest.raises(ValueError, match="temperature >= 0"):
        generate(model, variables, prompt, 3, jax.random.key(0), temperature=-1.0)


def test_generate_compiles_once_per_model_and_length(monkeypatch):
    """A second call with the same model, length, temperature and prompt shape reuses the compiled
    sampler: the model is not traced again."""
    model, variables, _ = _built("char-rnn")
    prompt = _example("char-rnn")[:, :2]
    traced = []
    apply = Model.apply
    monkeypatch.setattr(
        Model, "apply", lambda self, *a, **k: (traced.append(1), apply(self, *a, **k))[1]
    )
    generate(model, variables, prompt, 5, jax.random.key(0))
    first = len(traced)
    assert first > 0
    generate(model, variables, prompt, 5, jax.random.key(1))
    assert len(traced) == first
    generate(model, variables, prompt, 6, jax.random.key(1))  # another length: a new sampler
    assert len(traced) > first


def test_char_lstm_rejects_float_tokens():
    model, variables, _ = _built("char-lstm")
    with pytest.raises(ValueError, match=r"integer tokens.*\[batch, time\]"):
        model.apply(variables, jnp.zeros((BATCH, TIME), jnp.float32))


# ---------------------------------------------------------------------------------------------
# Configuration reaches the module


def _shapes(name, **config):
    model = get_model(name, **config)
    variables = jax.eval_shape(model.init, jax.random.key(0), _example(name))
    return model, jax.tree.map(lambda a: tuple(a.shape), variables["params"])


def test_config_overrides_reach_sequence_module():
    model, p = _shapes(
        "lstm-classifier", hidden_size=7, num_layers=2, bidirectional=True, num_classes=3
    )
    assert (model.module.hidden_size, model.module.num_layers, model.module.bidirectional) == (
        7,
        2,
        True,
    )
    assert set(p["LSTM_0"]) == {"layer_0", "layer_0_reverse", "layer_1", "layer_1_reverse"}
    assert p["LSTM_0"]["layer_0"]["w_h"] == (7, 28)
    assert p["LSTM_0"]["layer_1"]["w_x"] == (14, 28)
    assert p["Dense_0"]["kernel"] == (14, 3)

    model, p = _shapes("rnn-regressor", hidden_size=5, num_outputs=4)
    assert set(p) == {"SimpleRNN_0", "Dense_0"}
    assert p["SimpleRNN_0"]["layer_0"] == {"w_x": (FEATURES, 5), "w_h": (5, 5), "b": (5,)}
    assert p["Dense_0"]["kernel"] == (5, 4)


def test_config_overrides_reach_cnn_and_char_lstm():
    model, p = _shapes(
        "cnn", features=(4, 8), pool_after=(True, False), dense_features=(6,), num_classes=3
    )
    assert [layer["kernel"] for layer in p.values()] == [
        (3, 3, 1, 4),
        (3, 3, 4, 8),
        (11 * 11 * 8, 6),
        (6, 3),
    ]

    model, p = _shapes("char-lstm", vocab_size=13, embed_size=3, hidden_size=5, num_layers=1)
    assert p["Embed_0"]["embedding"] == (13, 3)
    assert set(p["LSTM_0"]) == {"layer_0"}
    assert p["LSTM_0"]["layer_0"]["w_x"] == (3, 20)
    assert p["Dense_0"]["kernel"] == (5, 13)

    model, p = _shapes("char-rnn", vocab_size=13, embed_size=3, hidden_size=5, num_layers=2)
    assert model.module.cell == "rnn"
    assert p["SimpleRNN_0"]["layer_1"] == {"w_x": (5, 5), "w_h": (5, 5), "b": (5,)}


def test_default_configs():
    assert get_model("lstm-classifier").module.num_outputs == 10
    assert get_model("lstm-regressor").module.num_outputs == 1
    assert get_model("cnn").module == jaxmodels.CNN()
    variables = jax.eval_shape(get_model("cnn").init, jax.random.key(0), _example("cnn"))
    assert _count(variables["params"]) == 93_322


# ---------------------------------------------------------------------------------------------
# apply is a pure function: jit, grad, dropout rng


def _scalar_loss(apply, name):
    def loss(params, x):
        out = apply({"params": params}, x)
        return jnp.sum(jnp.sin(out))

    return loss


def _random_like(tree, seed):
    """A numpy random direction with the structure of ``tree``, of unit norm overall."""
    rng = np.random.default_rng(seed)
    leaves, treedef = jax.tree.flatten(tree)
    direction = [rng.standard_normal(leaf.shape).astype(np.float32) for leaf in leaves]
    norm = np.sqrt(sum(float(np.sum(d * d)) for d in direction))
    return jax.tree.unflatten(treedef, [d / norm for d in direction])


@pytest.mark.parametrize(
    "name", ["cnn", "lstm-classifier", "rnn-regressor", "char-lstm", "char-rnn"]
)
def test_apply_under_jit_and_grad(name):
    model, variables, apply = _built(name)
    x = _example(name, seed=3)
    before = jax.tree.map(np.array, variables)
    eager = model.apply(variables, x)
    jitted = apply(variables, x)
    np.testing.assert_allclose(jitted, eager, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(apply(variables, x), jitted)  # same inputs, same outputs
    chex.assert_trees_all_equal(variables, before)  # apply does not touch its inputs

    params = variables["params"]
    g = jax.jit(jax.grad(_scalar_loss(model.apply, name)))(params, x)
    chex.assert_trees_all_equal_shapes_and_dtypes(g, params)
    chex.assert_tree_all_finite(g)
    for path, leaf in jax.tree_util.tree_leaves_with_path(g):
        assert float(np.abs(leaf).max()) > 0, jax.tree_util.keystr(path)

    # the gradient is the derivative: central difference along a random unit direction, with the
    # shifted parameters made in numpy and run through the already compiled apply
    direction, eps = _random_like(params, 11), 1e-2

    def shifted_loss(step):
        shifted = jax.tree.map(lambda p, d: np.asarray(p) + np.float32(step) * d, params, direction)
        return float(np.sum(np.sin(np.asarray(apply({"params": shifted}, x), np.float64))))

    numeric = (shifted_loss(eps) - shifted_loss(-eps)) / (2 * eps)
    analytic = sum(
        float(np.vdot(np.asarray(a, np.float64), d))
        for a, d in zip(jax.tree.leaves(g), jax.tree.leaves(direction))
    )
    np.testing.assert_allclose(analytic, numeric, rtol=1e-2, atol=1e-4)


@pytest.mark.parametrize("name", ["lstm-classifier", "rnn-regressor"])
def test_grad_with_seq_lengths_ignores_padding(name):
    """Under jit + grad with seq_lengths, inputs past a sequence's length get zero gradient."""
    _, variables, apply = _built(name)
    xs, lengths = _example(name, seed=3), jnp.array(LENGTHS)

    @jax.jit
    def input_grad(xs):
        return jax.grad(lambda xs: jnp.sum(apply(variables, xs, seq_lengths=lengths) ** 2))(xs)

    g = input_grad(xs)
    for n, length in enumerate(LENGTHS):
        np.testing.assert_array_equal(g[n, length:], 0)
        assert float(jnp.abs(g[n, :length]).max()) > 0


DROPOUT_CASES = {  # (the CNN's dropout is tested in test_layers.py)
    "lstm-classifier": {"dropout_rate": 0.5, "num_layers": 2, "bidirectional": True},
    "char-lstm": {"dropout_rate": 0.5},
}


@pytest.mark.parametrize("name", list(DROPOUT_CASES))
def test_dropout_rng_via_apply(name):
    config = DROPOUT_CASES[name]
    model, variables, apply = _built(name, **config)
    x = _example(name, seed=2)
    without = {k: v for k, v in config.items() if k != "dropout_rate"}
    eval_out = _built(name, **without)[2](variables, x)  # the same model without dropout
    # train=False: no dropout, whatever the rng
    np.testing.assert_allclose(
        apply(variables, x, train=False, rng=jax.random.key(5)), eval_out, rtol=1e-6, atol=1e-6
    )
    a = apply(variables, x, train=True, rng=jax.random.key(5))
    a2 = apply(variables, x, train=True, rng=jax.random.key(5))
    b = apply(variables, x, train=True, rng=jax.random.key(6))
    chex.assert_shape(a, CONFIGS[name][1])
    np.testing.assert_array_equal(a, a2)
    assert not np.allclose(a, eval_out)
    assert not np.allclose(a, b)
    with pytest.raises(Exception, match="dropout"):  # train=True needs an rng
        model.apply(variables, x, train=True)


def test_init_depends_only_on_key():
    model, a, _ = _built("rnn-regressor")  # initialised with key 1
    xs = _example("rnn-regressor", seed=5)
    chex.assert_trees_all_close(
        a, model.init(jax.random.key(1), xs), rtol=1e-6, atol=1e-7
    )  # eager == jit
    b = model.init(jax.random.key(2), xs)
    assert not np.allclose(
        a["params"]["SimpleRNN_0"]["layer_0"]["w_x"], b["params"]["SimpleRNN_0"]["layer_0"]["w_x"]
    )
