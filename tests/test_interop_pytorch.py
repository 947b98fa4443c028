"""``jaxmodels.interop.pytorch``: PyTorch modules' weights in and out of jaxmodels.

Parity both ways: torch -> ours (``from_torch`` of a torch-initialised module) and ours -> torch
(``to_torch`` of random variables), each comparing outputs, final states and the gradients of one
loss with respect to the inputs and every parameter, ours against PyTorch's, within float32
tolerance. PyTorch's parameter gradients are compared in our layout: put into a copy of the
module in place of its parameters (bias_hh's zeroed: db = d bias_ih) and converted by
``from_torch``, the same linear map as the weights'. Round trips exact; errors named.

The largest absolute difference of each parity test is recorded in ``DIFFS`` and printed when the
module finishes (visible with ``pytest -s``).
"""

from __future__ import annotations

import copy
import functools
import re
import subprocess
import sys

import numpy as np
import pytest
from _diffs import DiffLog, assert_same_bits, leaves

torch = pytest.importorskip("torch")

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import jaxmodels  # noqa: E402
from jaxmodels.bench.torch_models import seed_cnn  # noqa: E402
from jaxmodels.interop.pytorch import flax_module_for, from_torch, to_torch  # noqa: E402

BATCH, TIME, FEATURES, HIDDEN = 3, 5, 4, 6
TOL = {"outputs": 1e-5, "gradients": 1e-4}  # absolute, float32

DIFFS = DiffLog("Largest |ours - PyTorch| per parity test (tests/test_interop_pytorch.py)")


@pytest.fixture(scope="module", autouse=True)
def _print_max_diffs():
    yield
    DIFFS.report()


# ---------------------------------------------------------------------------------------------
# Helpers


def torch_recurrent(kind, num_layers=1, bidirectional=False, batch_first=True, bias=True, seed=0):
    """kind: 'lstm', 'rnn_tanh' or 'rnn_relu'; PyTorch's own initialisation (bias_hh nonzero)."""
    torch.manual_seed(seed)
    cls, extra = (
        (torch.nn.LSTM, {}) if kind == "lstm" else (torch.nn.RNN, {"nonlinearity": kind[4:]})
    )
    return cls(
        FEATURES,
        HIDDEN,
        num_layers=num_layers,
        bias=bias,
        batch_first=batch_first,
        bidirectional=bidirectional,
        **extra,
    )


def torch_linear(bias=True, seed=0):
    torch.manual_seed(seed)
    return torch.nn.Linear(FEATURES, HIDDEN, bias=bias)


def torch_cnn(seed=0):
    torch.manual_seed(seed)
    return seed_cnn()


def random_variables(module, seed=1, zero_biases=False):
    """Variables of from_torch(module)'s tree and shapes, random normal; with ``zero_biases`` the
    recurrent "b" and dense "bias" leaves are zeros (what a bias=False module takes)."""
    rng = np.random.default_rng(seed)

    def leaf(path, like):
        if zero_biases and path[-1].key in ("b", "bias"):
            return jnp.zeros(like.shape, like.dtype)
        return jnp.asarray((0.5 * rng.standard_normal(like.shape)).astype(np.float32))

    return jax.tree_util.tree_map_with_path(leaf, from_torch(module))


def has_bias(module) -> bool:
    return any("bias" in name for name, _ in module.named_parameters())


def torch_grads_in_our_layout(module, grads: dict) -> dict:
    """PyTorch's parameter gradients {name: tensor} as our variables: a copy of the module holding
    them, bias_hh's zeroed (our db is d bias_ih, which equals d bias_hh), through ``from_torch``."""
    holder = copy.deepcopy(module)
    with torch.no_grad():
        for name, p in holder.named_parameters():
            p.copy_(torch.zeros_like(p) if name.startswith("bias_hh") else grads[name])
    return from_torch(holder)


@functools.cache
def our_loss_and_grads(flax_module):
    """jit((variables, x, cots) -> ((d variables, d x), (outputs, finals))) of the loss
    sum(outputs * cots[0]) (+ sum(h_n * cots[1]) for the recurrent modules); finals: (h_n,) or
    (h_n, c_n) for the recurrent modules, else ()."""

    def loss(variables, x, cots):
        out = flax_module.apply(variables, x)
        finals = ()
        if isinstance(out, tuple):  # recurrent: (outputs, h_n or (h_n, c_n))
            out, final = out
            finals = final if isinstance(final, tuple) else (final,)
        total = jnp.sum(out * cots[0]) + sum(jnp.sum(f * c) for f, c in zip(finals[:1], cots[1:]))
        return total, (out, finals)

    return jax.jit(jax.grad(loss, argnums=(0, 1), has_aux=True))


swap = lambda a: a.swapaxes(0, 1)
same = lambda a: a
# Our layout against torch's: (our x -> torch's x, torch's d x -> ours, torch's outputs -> ours).
LAYOUTS = {
    "same": (same, same, same),
    "time_first": (swap, swap, swap),  # batch_first=False: torch's [time, batch, ...]
    "nchw": (lambda a: a.transpose(0, 3, 1, 2), lambda a: a.transpose(0, 2, 3, 1), same),
}


def check_parity(case, module, variables, x, layout):
    """Ours (flax_module_for(module) on ``variables`` and x) against the torch module (holding
    the same weights) on x in torch's ``layout``: outputs, final state, the gradients with
    respect to x and to the parameters, recorded in DIFFS under ``case``. Returns our outputs."""
    x_to_torch, d_x_back, out_back = LAYOUTS[layout]
    xt = torch.tensor(x_to_torch(x), requires_grad=True)
    out_t, finals_t = module(xt), ()
    if isinstance(out_t, tuple):  # recurrent: (outputs, h_n or (h_n, c_n))
        out_t, final = out_t
        finals_t = final if isinstance(final, tuple) else (final,)
    out_t = out_back(out_t)
    rng = np.random.default_rng(2)
    cots = [rng.standard_normal(a.shape).astype(np.float32) for a in (out_t, *finals_t[:1])]
    loss_t = sum((a * torch.from_numpy(c)).sum() for a, c in zip((out_t, *finals_t[:1]), cots))
    names, params = zip(*module.named_parameters())
    d_x_t, *d_params_t = torch.autograd.grad(loss_t, [xt, *params])

    (d_vars, d_x), (out, finals) = our_loss_and_grads(flax_module_for(module))(variables, x, cots)
    DIFFS.assert_close(case, "outputs", out, out_t.detach().numpy(), TOL["outputs"])
    assert len(finals) == len(finals_t)
    for ours, theirs in zip(finals, finals_t):
        DIFFS.assert_close(case, "final state", ours, theirs.detach().numpy(), TOL["outputs"])
    DIFFS.assert_close(case, "grad inputs", d_x, d_x_back(d_x_t.numpy()), TOL["gradients"])
    ours = leaves(d_vars)
    theirs = leaves(torch_grads_in_our_layout(module, dict(zip(names, d_params_t))))
    assert ours.keys() == theirs.keys()
    no_grad = () if has_bias(module) else ("['b']", "['bias']")  # bias=False: torch has no db
    for path, grad in theirs.items():
        if not path.endswith(no_grad):
            DIFFS.assert_close(case, "grad params", ours[path], grad, TOL["gradients"])
    return out


# ---------------------------------------------------------------------------------------------
# Parity


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("batch_first", [True, False], ids=["batch_first", "time_first"])
@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
@pytest.mark.parametrize("num_layers", [1, 2], ids=["1layer", "2layers"])
@pytest.mark.parametrize("kind", ["lstm", "rnn_tanh", "rnn_relu"])
@pytest.mark.parametrize("direction", ["from_torch", "to_torch"])
def test_recurrent_parity(direction, kind, num_layers, bidirectional, batch_first, bias, request):
    module = torch_recurrent(kind, num_layers, bidirectional, batch_first, bias)
    if direction == "from_torch":
        variables = from_torch(module)
    else:
        variables = random_variables(module, zero_biases=not bias)
        assert to_torch(variables, module) is module
    xs = np.random.default_rng(3).standard_normal((BATCH, TIME, FEATURES)).astype(np.float32)
    layout = "same" if batch_first else "time_first"
    check_parity(request.node.callspec.id, module, variables, xs, layout)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("direction", ["from_torch", "to_torch"])
def test_linear_parity(direction, bias, request):
    module = torch_linear(bias)
    if direction == "from_torch":
        variables = from_torch(module)
    else:
        variables = random_variables(module, zero_biases=not bias)
        to_torch(variables, module)
    x = np.random.default_rng(3).standard_normal((BATCH, FEATURES)).astype(np.float32)
    check_parity(f"linear-{request.node.callspec.id}", module, variables, x, "same")


@pytest.mark.parametrize("direction", ["from_torch", "to_torch"])
def test_seed_cnn_parity(direction):
    module = torch_cnn()
    if direction == "from_torch":
        variables = from_torch(module)
    else:
        variables = random_variables(module)
        variables["params"] = jax.tree.map(lambda a: 0.2 * a, variables["params"])  # He-like scale
        to_torch(variables, module)
    images = np.random.default_rng(3).standard_normal((2, 28, 28, 1)).astype(np.float32)
    check_parity(f"seed_cnn-{direction}", module, variables, images, "nchw")


def test_seed_cnn_naive_flatten_gives_wrong_logits():
    """Transposing the first Linear after Flatten without permuting its rows reads torch's
    (c, h, w) features in our (h, w, c) order: wrong logits. from_torch's permutation: right."""
    module = torch_cnn()
    images = np.random.default_rng(4).standard_normal((4, 28, 28, 1)).astype(np.float32)
    with torch.no_grad():
        logits_t = module(torch.from_numpy(images.transpose(0, 3, 1, 2))).numpy()
    variables = from_torch(module)
    naive = copy.deepcopy(variables)
    naive["params"]["Dense_0"]["kernel"] = jnp.asarray(module[9].weight.detach().numpy().T)
    apply = jax.jit(flax_module_for(module).apply)
    right = float(np.max(np.abs(np.asarray(apply(variables, images)) - logits_t)))
    wrong = float(np.max(np.abs(np.asarray(apply(naive, images)) - logits_t)))
    DIFFS.largest[("seed_cnn-naive_flatten (must be large)", "outputs")] = wrong
    DIFFS.largest[("seed_cnn-converted (naive's control)", "outputs")] = right
    assert right <= TOL["outputs"]
    assert wrong > 1e-2, f"the naive transpose should give wrong logits, differs by only {wrong}"
    # the same weights, only in another order
    naive_rows = np.sort(np.asarray(naive["params"]["Dense_0"]["kernel"]), axis=0)
    assert_same_bits(
        naive_rows, np.sort(np.asarray(variables["params"]["Dense_0"]["kernel"]), axis=0)
    )


# ---------------------------------------------------------------------------------------------
# Round trips, and the variables' tree against the Flax module's own

ROUND_TRIP = {
    "lstm-2layers-bi": lambda seed: torch_recurrent("lstm", 2, True, seed=seed),
    "lstm-no_bias": lambda seed: torch_recurrent("lstm", 1, True, bias=False, seed=seed),
    "rnn_relu-2layers": lambda seed: torch_recurrent("rnn_relu", 2, False, False, seed=seed),
    "rnn_tanh-no_bias": lambda seed: torch_recurrent("rnn_tanh", 2, True, bias=False, seed=seed),
    "linear": lambda seed: torch_linear(True, seed),
    "linear-no_bias": lambda seed: torch_linear(False, seed),
    "seed_cnn": torch_cnn,
}


@pytest.mark.parametrize("name", ROUND_TRIP)
def test_torch_round_trip_is_exact(name):
    """to_torch(from_torch(m)) gives m's state_dict bitwise, but for the documented bias split:
    bias_ih + bias_hh the same bits, bias_hh zeros."""
    original, target = ROUND_TRIP[name](0), ROUND_TRIP[name](1)
    to_torch(from_torch(original), target)
    before, after = original.state_dict(), target.state_dict()
    assert before.keys() == after.keys()
    for key in before:
        if key.startswith("bias_ih"):
            continue
        if key.startswith("bias_hh"):
            ih = key.replace("bias_hh", "bias_ih")
            assert_same_bits(after[ih] + after[key], before[ih] + before[key], key)
            assert not after[key].any()
        else:
            assert_same_bits(after[key], before[key], key)


@pytest.mark.parametrize("name", ROUND_TRIP)
def test_ours_round_trip_is_exact(name):
    """from_torch(to_torch(v, m)) == v bitwise, signed zeros in b included (bias_hh is -0.0)."""
    module = ROUND_TRIP[name](0)
    variables = random_variables(module, zero_biases=not has_bias(module))
    if name == "lstm-2layers-bi":
        b = np.asarray(variables["params"]["layer_0"]["b"]).copy()
        b[:3] = [0.0, -0.0, 0.0]
        variables["params"]["layer_0"]["b"] = jnp.asarray(b)
    back = from_torch(to_torch(variables, module))
    assert jax.tree.structure(back) == jax.tree.structure(variables)
    for path, leaf in leaves(variables).items():
        assert_same_bits(leaves(back)[path], leaf, path)


@pytest.mark.parametrize("name", ROUND_TRIP)
def test_variables_match_the_flax_modules_own(name):
    """from_torch's tree and shapes are those of flax_module_for(m).init."""
    module = ROUND_TRIP[name](0)
    x = (1, 2, FEATURES)  # [batch, time, features]
    if name.startswith(("linear", "seed_cnn")):
        x = (1, 28, 28, 1) if name == "seed_cnn" else (1, FEATURES)
    init = jax.eval_shape(flax_module_for(module).init, jax.random.key(0), jnp.zeros(x))
    shapes = lambda tree: jax.tree.map(lambda a: (a.shape, a.dtype), tree)
    assert shapes(from_torch(module)) == shapes(init)


def test_flax_module_for():
    lstm = torch.nn.LSTM(FEATURES, 8, num_layers=3, bidirectional=True, dropout=0.25)
    expected = jaxmodels.LSTM(hidden_size=8, num_layers=3, bidirectional=True, dropout_rate=0.25)
    assert flax_module_for(lstm) == expected
    rnn = flax_module_for(torch.nn.RNN(FEATURES, 5, nonlinearity="relu"))
    assert isinstance(rnn, jaxmodels.SimpleRNN) and rnn.activation == "relu"
    assert flax_module_for(torch.nn.RNN(FEATURES, 5)).activation == "tanh"
    dense = flax_module_for(torch.nn.Linear(FEATURES, 7, bias=False))
    assert isinstance(dense, nn.Dense) and dense.features == 7 and dense.use_bias
    assert flax_module_for(seed_cnn()) == jaxmodels.CNN()


# ---------------------------------------------------------------------------------------------
# Errors


def test_proj_size_is_refused():
    module = torch.nn.LSTM(FEATURES, HIDDEN, proj_size=3)
    for call in (from_torch, flax_module_for, lambda m: to_torch({"params": {}}, m)):
        with pytest.raises(ValueError, match="proj_size=3"):
            call(module)


@pytest.mark.parametrize(
    "module",
    [torch.nn.GRU(4, 6), torch.nn.Conv2d(1, 2, 3), torch.nn.ReLU()],
    ids=["GRU", "Conv2d", "ReLU"],
)
def test_other_module_types_are_refused(module):
    supported = re.escape("supported: torch.nn.LSTM, torch.nn.RNN (tanh or relu), torch.nn.Linear")
    for call in (from_torch, flax_module_for, lambda m: to_torch({"params": {}}, m)):
        with pytest.raises(
            ValueError, match=rf"type torch\.nn\..*{type(module).__name__};.*{supported}"
        ):
            call(module)


def other_sequentials():
    extra = seed_cnn()
    extra.append(torch.nn.Softmax(dim=1))
    wider = seed_cnn()
    wider[0] = torch.nn.Conv2d(1, 32, 5)
    dropout = seed_cnn()
    dropout[10] = torch.nn.Dropout()
    padded = seed_cnn()
    padded[2] = torch.nn.MaxPool2d(2, ceil_mode=True)
    return {
        "extra layer": (extra, "of 12 layers; got 13"),
        "kernel size": (wider, r"layer 0 is Conv2d\(.*kernel_size=\(5, 5\)"),
        "other layer": (dropout, r"layer 10 is Dropout\(\), the seed CNN's is ReLU\(\)"),
        "pool option": (padded, "layer 2 is MaxPool2d.*ceil_mode=True"),
        "other sizes": (
            torch.nn.Sequential(torch.nn.Linear(3, 3)),
            r"layer 0 is Linear\(in_features=3",
        ),
    }


@pytest.mark.parametrize("what", other_sequentials())
def test_other_sequentials_are_refused(what):
    module, message = other_sequentials()[what]
    for call in (from_torch, flax_module_for, lambda m: to_torch({"params": {}}, m)):
        with pytest.raises(ValueError, match=f"only the seed CNN converts.*{message}"):
            call(module)


def test_wrong_shapes_are_refused_before_writing():
    module = torch_recurrent("lstm", 2, True)
    before = copy.deepcopy(module.state_dict())
    variables = from_torch(torch.nn.LSTM(FEATURES + 1, HIDDEN, num_layers=2, bidirectional=True))
    variables["params"]["layer_0"] = from_torch(module)["params"]["layer_0"]  # a right one first
    message = "params/layer_0_reverse/w_x has shape (5, 24), but torch.nn.LSTM(4, 6, num_layers=2, "
    with pytest.raises(ValueError, match=re.escape(message) + r".*needs \(4, 24\)"):
        to_torch(variables, module)
    for key, value in module.state_dict().items():
        assert_same_bits(value, before[key], key)
    cnn = from_torch(seed_cnn())
    cnn["params"]["Dense_0"]["kernel"] = jnp.zeros((64 * 4 * 4, 64))
    with pytest.raises(
        ValueError,
        match=re.escape("Dense_0/kernel has shape (1024, 64), but the seed CNN needs (576, 64)"),
    ):
        to_torch(cnn, seed_cnn())


def test_missing_and_extra_parameters_are_named():
    with pytest.raises(ValueError, match=r"missing: \['params/layer_1/b', .*not in it: \[\]"):
        to_torch(from_torch(torch.nn.RNN(FEATURES, HIDDEN)), torch.nn.RNN(FEATURES, HIDDEN, 2))
    with pytest.raises(ValueError, match=r"missing: \[\], not in it: \['params/layer_0_reverse/b'"):
        to_torch(
            from_torch(torch.nn.RNN(FEATURES, HIDDEN, bidirectional=True)),
            torch.nn.RNN(FEATURES, HIDDEN),
        )


@pytest.mark.parametrize("kind", ["lstm", "rnn_tanh", "linear"])
def test_nonzero_bias_into_a_bias_free_module_is_refused(kind):
    module = torch_linear(bias=False) if kind == "linear" else torch_recurrent(kind, bias=False)
    variables = random_variables(module)
    leaf = "bias" if kind == "linear" else "layer_0/b"
    with pytest.raises(ValueError, match=f"params/{leaf} is not all zeros, .*bias=False"):
        to_torch(variables, module)
    to_torch(random_variables(module, zero_biases=True), module)  # zeros are fine


def test_imports_without_torch():
    """The module imports torch only inside its functions."""
    code = "import sys; sys.modules['torch'] = None; import jaxmodels.interop.pytorch"
    run = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False
    )
    assert run.returncode == 0, run.stderr
