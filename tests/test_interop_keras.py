"""``jaxmodels.interop.keras``: Keras 3 layers' weights in and out of jaxmodels (JAX backend).

Parity both ways: keras -> ours (``from_keras`` of a Keras-initialised layer) and ours -> keras
(``to_keras`` of random variables), comparing outputs (and the recurrent layers' final states)
within float32 tolerance; for the seed network on random images and on real MNIST test images
(when present), its probabilities and, with a "linear" last layer, its logits. Round trips
bitwise; errors named.

Layers are built once (``keras_layer``): instance 0 keeps Keras' initialisation and is only read;
instance 1 is written by ``to_keras`` before every use. The largest absolute difference of each
parity test is recorded in ``DIFFS`` and printed when the module finishes (``pytest -s``).
"""

from __future__ import annotations

import contextlib
import functools
import os

import numpy as np
import pytest
from _diffs import DiffLog, assert_same_bits, leaves
from _paths import MNIST_DIR

os.environ["KERAS_BACKEND"] = "jax"  # before Keras is imported
keras = pytest.importorskip("keras")
if keras.backend.backend() != "jax":
    pytest.skip("Keras was imported with another backend", allow_module_level=True)

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import jaxmodels  # noqa: E402
from jaxmodels.data.datasets import get_dataset  # noqa: E402
from jaxmodels.interop.keras import flax_module_for, from_keras, to_keras  # noqa: E402

L = keras.layers
BATCH, TIME, FEATURES, HIDDEN = 3, 5, 4, 6
TOL = 1e-5  # absolute, float32 outputs
SEQ, IMAGES = (BATCH, TIME, FEATURES), (2, 28, 28, 1)
DIFFS = DiffLog("Largest |ours - Keras| per parity test (tests/test_interop_keras.py)")


@pytest.fixture(scope="module", autouse=True)
def _print_max_diffs():
    yield
    DIFFS.report()


def seed_layers(last="softmax"):
    """The seed's Keras network (Deep Learning with Python, 5.1) after its Input, unbuilt, the
    last activation ``last``."""
    return [
        L.Conv2D(32, 3, activation="relu"),
        L.MaxPooling2D(2),
        L.Conv2D(64, 3, activation="relu"),
        L.MaxPooling2D(2),
        L.Conv2D(64, 3, activation="relu"),
        L.Flatten(),
        L.Dense(64, activation="relu"),
        L.Dense(10, activation=last),
    ]


def seed_cnn(last="softmax", image=(28, 28, 1)):
    return keras.Sequential([keras.Input(image), *seed_layers(last)])


recurrent = dict(return_sequences=True, return_state=True)
LAYERS = {  # name: (make the layer, the shape of its input)
    "lstm": (lambda: L.LSTM(HIDDEN, **recurrent), SEQ),
    "lstm-last_step": (lambda: L.LSTM(HIDDEN), SEQ),
    "lstm-no_bias": (lambda: L.LSTM(HIDDEN, use_bias=False, **recurrent), SEQ),
    **{
        f"rnn_{f}": (lambda f=f: L.SimpleRNN(HIDDEN, activation=f, **recurrent), SEQ)
        for f in ("tanh", "relu", "sigmoid", "linear")
    },
    "conv": (lambda: L.Conv2D(5, 3, activation="relu"), (BATCH, 8, 7, 2)),
    "conv-same_strided": (lambda: L.Conv2D(5, (2, 3), (2, 1), "same"), (BATCH, 7, 8, 2)),
    "conv-dilated_groups": (
        lambda: L.Conv2D(4, 3, dilation_rate=2, groups=2, use_bias=False),
        (BATCH, 9, 9, 4),
    ),
    "dense": (lambda: L.Dense(HIDDEN, activation="relu"), (BATCH, FEATURES)),
    "dense-no_bias": (lambda: L.Dense(HIDDEN, use_bias=False), (BATCH, FEATURES)),
    "seed_cnn": (seed_cnn, IMAGES),
    "seed_cnn-logits": (lambda: seed_cnn("linear"), IMAGES),
    "cnn-32x32x3": (  # the seed's layers on other images: CNN() reads their size from x
        lambda: seed_cnn(image=(32, 32, 3)),
        (2, 32, 32, 3),
    ),
}


@contextlib.contextmanager
def keras_promotion():
    """JAX's default promotion rules, which Keras' own code relies on (conftest makes them
    strict for ours)."""
    with jax.numpy_rank_promotion("allow"), jax.numpy_dtype_promotion("standard"):
        yield


@functools.cache
def keras_layer(name, instance=0):
    """Instance ``instance`` of LAYERS[name], built (Keras' random initialisation)."""
    make, shape = LAYERS[name]
    with keras_promotion():
        layer = make()
        layer(np.zeros(shape, np.float32))  # builds it
    return layer


def inputs(name, seed=3):
    return np.random.default_rng(seed).standard_normal(LAYERS[name][1]).astype(np.float32)


def random_variables(layer, seed=1):
    """Variables of from_keras(layer)'s tree and shapes, random normal (scale 0.1 for the CNNs,
    0.5 else); the biases zeros where the layer has none."""
    rng = np.random.default_rng(seed)
    scale = 0.1 if isinstance(layer, keras.Sequential) else 0.5

    def leaf(path, like):
        if path[-1].key in ("b", "bias") and not getattr(layer, "use_bias", True):
            return jnp.zeros(like.shape, like.dtype)
        return jnp.asarray((scale * rng.standard_normal(like.shape)).astype(np.float32))

    return jax.tree_util.tree_map_with_path(leaf, from_keras(layer))


def ours_as_keras(layer, variables, x) -> list:
    """flax_module_for(layer)'s outputs as the Keras layer returns them (see its docstring)."""
    out = jax.jit(flax_module_for(layer).apply)(variables, x)
    if isinstance(layer, L.RNN):
        outputs, final = out
        seq = outputs if layer.return_sequences else outputs[:, -1]
        finals = [f[0] for f in (final if isinstance(final, tuple) else (final,))]
        return [seq, *finals] if layer.return_state else [seq]
    last = layer.layers[-1] if isinstance(layer, keras.Sequential) else layer
    with keras_promotion():
        return [last.activation(out)]


def check_parity(case, layer, variables, x):
    with keras_promotion():
        theirs = layer(x)
    theirs = theirs if isinstance(theirs, (list, tuple)) else [theirs]
    ours = ours_as_keras(layer, variables, x)
    assert len(ours) == len(theirs)
    for what, a, b in zip(("outputs", "final h", "final c"), ours, theirs):
        DIFFS.assert_close(case, what, np.asarray(a), np.asarray(b), TOL)


def numpy(variable) -> np.ndarray:
    """A copy of a Keras variable's value."""
    return keras.ops.convert_to_numpy(variable.value)


# ---------------------------------------------------------------------------------------------
# Parity


@pytest.mark.parametrize("name", LAYERS)
@pytest.mark.parametrize("direction", ["from_keras", "to_keras"])
def test_parity(direction, name):
    if direction == "from_keras":
        layer = keras_layer(name)
        variables = from_keras(layer)
    else:
        layer = keras_layer(name, 1)
        variables = random_variables(layer)
        assert to_keras(variables, layer) is layer
    check_parity(f"{name}-{direction}", layer, variables, inputs(name))


def test_seed_cnn_on_mnist():
    """The real Keras model and CNN() give the same probabilities, and with a linear last layer
    holding the same weights the same logits, on MNIST test images."""
    try:
        data = get_dataset("mnist", data_dir=MNIST_DIR)
    except FileNotFoundError as error:
        pytest.skip(f"no MNIST files: {error}")
    images = (data.x_test if data.x_test is not None else data.x_train)[:256]
    model = keras_layer("seed_cnn")
    variables = from_keras(model)
    check_parity("seed_cnn-mnist", model, variables, images)
    logits = to_keras(variables, keras_layer("seed_cnn-logits", 1))
    check_parity("seed_cnn-mnist (logits)", logits, variables, images)


def test_flatten_order_needs_no_permutation():
    """Keras' Flatten reads NHWC maps in (h, w, c) order as CNN() does: Dense_0's kernel copied as
    it is gives Keras' logits (test_parity), its rows permuted as for PyTorch's (c, h, w) do not."""
    model = keras_layer("seed_cnn-logits", 1)
    variables = random_variables(model, seed=7)
    to_keras(variables, model)
    dense_0 = variables["params"]["Dense_0"]  # rows (h, w, c) -> (c, h, w), C, H, W = 64, 3, 3
    dense_0["kernel"] = (
        dense_0["kernel"].reshape(3, 3, 64, 64).transpose(2, 0, 1, 3).reshape(576, 64)
    )
    images = inputs("seed_cnn-logits")
    with keras_promotion():
        theirs = np.asarray(model(images))
    wrong = float(np.max(np.abs(np.asarray(ours_as_keras(model, variables, images)[0]) - theirs)))
    DIFFS.largest[("seed_cnn-permuted_flatten (must be large)", "outputs")] = wrong
    assert wrong > 1e-2, f"rows read in (c, h, w) order should give other logits, differ by {wrong}"


# ---------------------------------------------------------------------------------------------
# Round trips, and the variables' tree against the Flax module's own


@pytest.mark.parametrize("name", LAYERS)
def test_round_trips_are_exact(name):
    """to_keras(from_keras(a), b) gives b a's variables bitwise; from_keras(to_keras(v, m)) == v
    bitwise, signed zeros included."""
    original, target = keras_layer(name), keras_layer(name, 1)
    to_keras(from_keras(original), target)
    for before, after in zip(original.weights, target.weights, strict=True):
        assert_same_bits(numpy(after), numpy(before), before.path)

    def signed_zeros(path, a):  # in the biases the layer has
        if path[-1].key in ("b", "bias") and getattr(target, "use_bias", True):
            return a.at[:2].set(jnp.array([0.0, -0.0]))
        return a

    variables = jax.tree_util.tree_map_with_path(signed_zeros, random_variables(target, seed=5))
    back = from_keras(to_keras(variables, target))
    assert jax.tree.structure(back) == jax.tree.structure(variables)
    for path, leaf in leaves(variables).items():
        assert_same_bits(leaves(back)[path], leaf, path)
    init = jax.eval_shape(flax_module_for(target).init, jax.random.key(0), inputs(name))
    shapes = lambda tree: jax.tree.map(lambda a: (a.shape, a.dtype), tree)
    assert shapes(back) == shapes(init)  # from_keras's tree is the Flax module's own


def test_flax_module_for():
    assert flax_module_for(keras_layer("lstm")) == jaxmodels.LSTM(hidden_size=HIDDEN)
    assert flax_module_for(keras_layer("rnn_relu")) == jaxmodels.SimpleRNN(
        HIDDEN, activation="relu"
    )
    assert flax_module_for(keras_layer("rnn_linear")).activation == "identity"
    conv = flax_module_for(keras_layer("conv-same_strided"))
    assert isinstance(conv, nn.Conv) and (conv.features, conv.kernel_size) == (5, (2, 3))
    assert (conv.strides, conv.padding) == ((2, 1), "SAME")
    dense = flax_module_for(keras_layer("dense-no_bias"))
    assert isinstance(dense, nn.Dense) and dense.features == HIDDEN and dense.use_bias
    assert flax_module_for(keras_layer("seed_cnn")) == jaxmodels.CNN()


# ---------------------------------------------------------------------------------------------
# Errors


def refused(layer, message, calls=("from_keras", "flax_module_for", "to_keras")):
    """Each of ``calls`` raises ValueError matching ``message`` for ``layer``."""
    functions = dict(from_keras=from_keras, flax_module_for=flax_module_for)
    functions["to_keras"] = lambda m: to_keras({"params": {}}, m)
    for call in map(functions.get, calls):
        with pytest.raises(ValueError, match=message):
            call(layer)


@pytest.mark.parametrize(
    "layer, message",
    [
        (L.LSTM(3, activation="relu"), "LSTM option activation='relu'"),
        (L.LSTM(3, recurrent_activation="hard_sigmoid"), "recurrent_activation='hard_sigmoid'"),
        (L.LSTM(3, go_backwards=True), "LSTM option go_backwards=True"),
        (L.SimpleRNN(3, stateful=True), "SimpleRNN option stateful=True"),
        (L.SimpleRNN(3, activation="elu"), "SimpleRNN option activation='elu'"),
        (L.Conv2D(3, 3, data_format="channels_first"), "data_format='channels_first'"),
        (L.GRU(3), r"layer type keras\..*GRU; supported: keras.layers.LSTM"),
        (L.Bidirectional(L.LSTM(3)), r"layer type keras\..*Bidirectional; supported"),
        (L.Conv1D(3, 3), r"layer type keras\..*Conv1D; supported"),
    ],
    ids=lambda v: v if isinstance(v, str) else type(v).__name__,
)
def test_unsupported_layers_are_refused(layer, message):
    refused(layer, message)


def test_unbuilt_layers_and_other_variables_are_refused():
    """flax_module_for needs no variables; from_keras and to_keras need the layer's own."""
    weights = ("from_keras", "to_keras")
    refused(L.Dense(3), r"keras.layers.Dense 'dense.*' is not built: call it once", weights)
    lora = L.Dense(3, lora_rank=2)
    lora.build((None, 4))
    message = r"its variables are \['bias', 'kernel', 'lora_kernel_a', 'lora_kernel_b'\]"
    refused(lora, message, weights)


OTHER_SEQUENTIALS = {  # name: (its layers, unbuilt, as edits of the seed's; the error)
    "extra layer": (lambda s: [*s, L.Softmax()], "of 8 layers; got 9"),
    "kernel size": (
        lambda s: [L.Conv2D(32, 5, activation="relu"), *s[1:]],
        r"layer 0 is Conv2D\(.*kernel_size=\(5, 5\)",
    ),
    "other layer": (
        lambda s: [*s[:6], L.Dropout(0.5), *s[6:]],
        r"layer 6 is Dropout\(\), the seed CNN's is Dense\(units=64",
    ),
    "no relu": (lambda s: [*s[:6], L.Dense(64), s[7]], "layer 6 is Dense.*activation='linear'"),
    "logits too early": (lambda s: [*s[:6], L.Dense(64), L.Dense(10)], "layer 6 is Dense"),
    "other sizes": (lambda s: [L.Dense(3)], r"layer 0 is Dense\(units=3"),
}


@pytest.mark.parametrize("what", OTHER_SEQUENTIALS)
def test_other_sequentials_are_refused(what):
    edit, message = OTHER_SEQUENTIALS[what]
    refused(keras.Sequential(edit(seed_layers())), f"only the seed CNN converts.*{message}")


def test_wrong_shapes_are_refused_before_writing():
    layer = keras_layer("lstm", 1)
    before = [numpy(v) for v in layer.weights]
    variables = random_variables(layer)
    variables["params"]["layer_0"]["w_h"] = jnp.zeros((HIDDEN, 4 * HIDDEN + 4))
    message = r"params/layer_0/w_h has shape \(6, 28\), but keras.layers.LSTM '.*' needs \(6, 24\)"
    with pytest.raises(ValueError, match=message):
        to_keras(variables, layer)
    for variable, value in zip(layer.weights, before):
        assert_same_bits(numpy(variable), value, variable.path)


def test_missing_extra_and_nonzero_bias_are_refused():
    dense = keras_layer("dense-no_bias", 1)
    with pytest.raises(ValueError, match=r"missing: \['params/bias'\], not in it: \['params/b'\]"):
        to_keras({"params": {"kernel": jnp.zeros((FEATURES, HIDDEN)), "b": 0}}, dense)
    variables = {"params": {"kernel": jnp.zeros((FEATURES, HIDDEN)), "bias": jnp.ones(HIDDEN)}}
    with pytest.raises(ValueError, match=r"params/bias is not all zeros.*\(use_bias=False\)"):
        to_keras(variables, dense)
