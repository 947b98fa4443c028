"""jaxmodels.nnx against the Linen modules: given the Linen module's variables, the NNX module gives
the same outputs, final carries and parameter gradients (bitwise: the same pure functions run on
the same arrays), eagerly and under ``nnx.jit``; the variables go Linen -> NNX -> Linen bitwise; a
freshly made NNX module has the Linen layout; mismatched variables raise ValueError naming the path
and both shapes."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _diffs import DiffLog
from flax import nnx

import jaxmodels as jm
from jaxmodels import nnx as jnnx

BATCH, TIME, FEATURES, HIDDEN = 3, 6, 4, 5
LENGTHS = jnp.array([6, 2, 0])  # full, short and empty sequences
IMAGE, CHANNELS = (10, 10), 2
CNN_FIELDS = {
    "features": (4, 6),  # 10x10 -> conv 8x8 -> pool 4x4 -> conv 2x2: Dense_0 reads 24 features
    "pool_after": (True, False),
    "dense_features": (8,),
    "num_classes": 3,
}

DIFFS = DiffLog("Largest |NNX - Linen| per quantity (tests/test_nnx.py)")


@pytest.fixture(scope="module", autouse=True)
def _print_max_diffs():
    yield
    DIFFS.report()


def _equal(case: str, quantity: str, ours, theirs, atol: float = 0.0) -> None:
    """Equal pytrees (same structure, dtypes, values; bitwise unless ``atol``), the largest
    difference recorded."""
    assert jax.tree.structure(ours) == jax.tree.structure(theirs), f"{case}: {quantity}"
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(ours), jax.tree.leaves(theirs)):
        try:
            DIFFS.assert_close(case, quantity, a, b, atol=atol)
        except AssertionError as error:
            raise AssertionError(f"{quantity}{jax.tree_util.keystr(path)}: {error}") from None


def _loss(outputs) -> jax.Array:
    """A scalar reading every output and final carry, weighted so no gradient is symmetric."""
    leaves = jax.tree.leaves(outputs)
    return sum(jnp.sum(jnp.sin(leaf) * (k + 1)) for k, leaf in enumerate(leaves))


def _nnx(kind: str, seed: int = 1, **fields) -> nnx.Module:
    """A freshly made NNX module of this kind and configuration."""
    if kind == "cnn":
        return jnnx.CNN(CHANNELS, image_size=IMAGE, **fields, rngs=nnx.Rngs(seed))
    module = {"lstm": jnnx.LSTM, "rnn": jnnx.SimpleRNN}[kind]
    return module(FEATURES, HIDDEN, **fields, rngs=nnx.Rngs(seed))


def _linen(kind: str, init: bool = False, **fields):
    """(Linen module, Linen variables, inputs). The variables come from Linen's ``init`` when
    ``init``, else from another NNX module's ``to_linen`` (``init`` runs a whole forward pass;
    test_round_trips_and_layout checks that both give the same tree, shapes and dtypes)."""
    key_init, key_x = jax.random.split(jax.random.key(0))
    if kind == "cnn":
        linen, x = jm.CNN(**fields), jax.random.normal(key_x, (BATCH, *IMAGE, CHANNELS))
    else:
        linen = {"lstm": jm.LSTM, "rnn": jm.SimpleRNN}[kind](HIDDEN, **fields)
        x = jax.random.normal(key_x, (BATCH, TIME, FEATURES))
    variables = linen.init(key_init, x) if init else jnnx.to_linen(_nnx(kind, 0, **fields))
    return linen, variables, x


def _value(outputs):
    return _loss(outputs), outputs


def _check_jit_grad(case: str, linen, variables, ours, *args, grad_atol=0.0, **kwargs) -> None:
    """Outputs and parameter gradients of ``_loss``: nnx.jit(nnx.grad) against jax.jit(jax.grad)
    (the gradients within ``grad_atol``, bitwise by default)."""
    linen_value = lambda params: _value(linen.apply({"params": params}, *args, **kwargs))
    expected_grads, expected = jax.jit(jax.grad(linen_value, has_aux=True))(variables["params"])
    grads, outputs = nnx.jit(nnx.grad(lambda m: _value(m(*args, **kwargs)), has_aux=True))(ours)
    _equal(case, "outputs (jit)", outputs, expected)
    _equal(case, "d params (jit)", nnx.to_pure_dict(grads), expected_grads, atol=grad_atol)


RECURRENT = [
    ("lstm", {"num_layers": 1, "bidirectional": False}),
    ("lstm", {"num_layers": 1, "bidirectional": True}),
    ("lstm", {"num_layers": 2, "bidirectional": False}),
    ("lstm", {"num_layers": 2, "bidirectional": True}),
    ("rnn", {"num_layers": 2, "bidirectional": True}),
]


@pytest.mark.parametrize("kind, fields", RECURRENT, ids=lambda v: str(v))
def test_recurrent_matches_linen(kind, fields):
    """Eagerly with an initial carry; under jit with the gradients."""
    linen, variables, xs = _linen(kind, **fields)
    ours = jnnx.from_linen(variables, _nnx(kind, **fields))
    case = f"{kind} {fields}"
    directions = 2 if fields["bidirectional"] else 1
    h0 = jax.random.normal(jax.random.key(2), (fields["num_layers"] * directions, BATCH, HIDDEN))
    args = (xs, (h0, -h0) if kind == "lstm" else h0)
    eager = ours(*args, seq_lengths=LENGTHS)
    _equal(case, "outputs (eager)", eager, linen.apply(variables, *args, seq_lengths=LENGTHS))
    _check_jit_grad(case, linen, variables, ours, xs, seq_lengths=LENGTHS)


@pytest.mark.parametrize("conv_impl, padding", [("patches", "VALID"), ("xla", "SAME")])
def test_cnn_matches_linen(conv_impl, padding):
    linen, variables, x = _linen("cnn", conv_impl=conv_impl, padding=padding, **CNN_FIELDS)
    ours = jnnx.from_linen(
        variables, _nnx("cnn", conv_impl=conv_impl, padding=padding, **CNN_FIELDS)
    )
    case = f"cnn {conv_impl} {padding}"
    _equal(case, "outputs (eager)", ours(x), linen.apply(variables, x))
    # conv_impl "xla" is nn.Conv and nn.max_pool in Linen but conv.conv_relu_pool_reference in
    # NNX: one function as two XLA programs, whose gradient reductions may sum in another order
    # (1 ulp of a bias gradient on some CPUs). "patches" runs the same code in both: bitwise.
    grad_atol = 1e-6 if conv_impl == "xla" else 0.0
    _check_jit_grad(case, linen, variables, ours, x, grad_atol=grad_atol)


@pytest.mark.parametrize("kind", ["lstm", "cnn"])
def test_dropout_only_when_training(kind):
    """Rate 1 drops everything, deterministically: the same as Linen's apply with train=True, so
    dropout sits where Linen's does. Rate 0.5: nothing dropped without ``train``, a new mask per
    call under nnx.jit."""
    fields = {"num_layers": 2} if kind == "lstm" else CNN_FIELDS
    first = lambda outputs: jax.tree.leaves(outputs)[0]
    linen, variables, x = _linen(kind, dropout_rate=1.0, **fields)
    ours = jnnx.from_linen(variables, _nnx(kind, dropout_rate=1.0, **fields))
    dropped = linen.apply(variables, x, train=True)
    _equal(kind, "outputs (train, rate 1)", ours(x, train=True), dropped)
    half = jnnx.from_linen(variables, _nnx(kind, dropout_rate=0.5, **fields))
    kept = first(linen.apply(variables, x))
    assert not np.array_equal(first(dropped), kept)
    _equal(kind, "outputs (eval, rate 0.5)", first(half(x)), kept)
    train = nnx.jit(lambda m, x: first(m(x, train=True)))
    draws = [train(half, x), train(half, x)]  # the rng stream advances: a new mask each call
    assert all(np.isfinite(a).all() and not np.array_equal(a, kept) for a in draws)
    assert not np.array_equal(*draws)


@pytest.mark.parametrize("kind", ["lstm", "rnn", "cnn"])
def test_round_trips_and_layout(kind):
    """Linen -> NNX -> Linen gives back the same arrays; a freshly made NNX module has the layout
    and dtypes of Linen's init, and its weights go NNX -> Linen -> NNX bitwise."""
    fields = CNN_FIELDS if kind == "cnn" else {"num_layers": 2, "bidirectional": True}
    _, variables, _ = _linen(kind, init=True, **fields)
    back = jnnx.to_linen(jnnx.from_linen(variables, _nnx(kind, **fields)))
    _equal(kind, "Linen -> NNX -> Linen", back, variables)
    assert all(a is b for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(variables)))
    fresh = _nnx(kind, seed=5, **fields)
    shapes = lambda tree: jax.tree.map(lambda a: (a.shape, a.dtype), tree)
    assert shapes(jnnx.to_linen(fresh)) == shapes(variables)
    moved = jnnx.from_linen(jnnx.to_linen(fresh), _nnx(kind, seed=6, **fields))
    _equal(kind, "NNX -> Linen -> NNX", jnnx.to_linen(moved), jnnx.to_linen(fresh))


def test_lstm_initial_forget_bias():
    lstm = jnnx.LSTM(FEATURES, HIDDEN, forget_bias=0.5, rngs=nnx.Rngs(0))
    b = np.asarray(jnnx.to_linen(lstm)["params"]["layer_0"]["b"]).reshape(4, HIDDEN)
    np.testing.assert_array_equal(b, np.array([0, 0.5, 0, 0])[:, None] * np.ones(HIDDEN))


def test_mismatched_variables_raise():
    variables = jnnx.to_linen(_nnx("lstm", num_layers=2))
    wide = jnnx.LSTM(FEATURES + 1, HIDDEN, num_layers=2, rngs=nnx.Rngs(0))
    before = jnnx.to_linen(wide)
    with pytest.raises(
        ValueError, match=r"params/layer_0/w_x of shape \(5, 20\).*got shape \(4, 20\)"
    ):
        jnnx.from_linen(variables, wide)
    _equal("lstm", "unchanged after an error", jnnx.to_linen(wide), before)
    deep = _nnx("lstm", num_layers=3)
    with pytest.raises(ValueError, match=r"missing \['params/layer_2/b'"):
        jnnx.from_linen(variables, deep)
    bidirectional = _nnx("lstm", num_layers=2, bidirectional=True)
    with pytest.raises(ValueError, match=r"missing \['params/layer_0_reverse/b'"):
        jnnx.from_linen(variables, bidirectional)
    with pytest.raises(ValueError, match=r"unexpected \['params/layer_2/b'"):
        jnnx.from_linen(jnnx.to_linen(deep), _nnx("lstm", num_layers=2))
    with pytest.raises(ValueError, match="one collection 'params'"):
        jnnx.from_linen({**variables, "batch_stats": {}}, wide)
    cnn_variables = jnnx.to_linen(_nnx("cnn", **CNN_FIELDS))
    other_image = jnnx.CNN(CHANNELS, image_size=(12, 12), **CNN_FIELDS, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"params/Dense_0/kernel of shape \(54, 8\).*\(24, 8\)"):
        jnnx.from_linen(cnn_variables, other_image)
    with pytest.raises(ValueError, match=r"features=5\], got shape \(3, 6, 4\)"):
        wide(jnp.ones((BATCH, TIME, FEATURES)))
    with pytest.raises(ValueError, match=r"Dense_0 reads 54 features"):
        other_image(jnp.ones((BATCH, *IMAGE, CHANNELS)))
