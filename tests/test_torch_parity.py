"""Parity with PyTorch's ``nn.LSTM`` / ``nn.RNN``: outputs, final state and gradients.

Weights are mapped from our pinned layout (docs/guides/math.md) to PyTorch's by ``load_torch_weights``:

    weight_ih_l{k}[_reverse] = w_x.T      [G*hidden, features]
    weight_hh_l{k}[_reverse] = w_h.T      [G*hidden, hidden]
    bias_ih_l{k}[_reverse]   = b          (our b is bias_ih + bias_hh)
    bias_hh_l{k}[_reverse]   = 0

with G = 4 (gates i, f, g, o, the same order in both) for the LSTM and G = 1 for the simple RNN;
our parameter subtree ``layer_{k}_reverse`` is PyTorch's suffix ``_reverse``. Variable lengths
are compared against ``pack_padded_sequence(..., enforce_sorted=False)`` / ``pad_packed_sequence``.

The largest absolute difference seen for each quantity is collected in ``DIFFS`` and printed
as a table when the module finishes (visible with ``pytest -s``).
"""

from __future__ import annotations

import pytest
from _diffs import DiffLog

torch = pytest.importorskip("torch")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence  # noqa: E402

import jaxmodels  # noqa: E402

BATCH, TIME, FEATURES, HIDDEN = 4, 7, 5, 6
# Unsorted, includes a length-1 sequence and a full-length one (PyTorch forbids length 0).
SEQ_LENGTHS = np.array([5, 7, 1, 3], dtype=np.int32)

# (outputs and final state, gradients): absolute tolerances per dtype.
TOL = {"float32": (1e-5, 1e-4), "float64": (1e-11, 1e-10)}

GATES = {"lstm": 4, "rnn": 1}

DIFFS = DiffLog("Largest |ours - PyTorch| per quantity (tests/test_torch_parity.py)")
assert_close = DIFFS.assert_close

# ---------------------------------------------------------------------------------------------
# Helpers


@pytest.fixture(scope="module", autouse=True)
def _print_max_diffs():
    yield
    DIFFS.report()


def x64(dtype: str):
    """Context enabling 64-bit JAX types for the float64 cases."""
    return jax.enable_x64(dtype == "float64")


def layer_names(num_layers: int, bidirectional: bool) -> list[str]:
    """Our subtree names in PyTorch's h_n order: index layer*directions + direction."""
    suffixes = ("", "_reverse") if bidirectional else ("",)
    return [f"layer_{k}{s}" for k in range(num_layers) for s in suffixes]


def random_params(rng, kind, features, hidden, num_layers=1, bidirectional=False, dtype="float32"):
    """{"layer_k[_reverse]": {"w_x", "w_h", "b"}} in the pinned layout, random normal values."""
    g = GATES[kind] * hidden
    directions = 2 if bidirectional else 1
    params = {}
    for name in layer_names(num_layers, bidirectional):
        k = int(name.split("_")[1])
        fin = features if k == 0 else directions * hidden
        params[name] = {
            "w_x": (0.5 * rng.standard_normal((fin, g))).astype(dtype),
            "w_h": (0.5 * rng.standard_normal((hidden, g))).astype(dtype),
            "b": (0.5 * rng.standard_normal((g,))).astype(dtype),
        }
    return params


def torch_suffix(name: str) -> str:
    """ "layer_1_reverse" -> "l1_reverse", "layer_0" -> "l0"."""
    parts = name.split("_")
    return f"l{parts[1]}" + ("_reverse" if parts[-1] == "reverse" else "")


def load_torch_weights(module, params: dict, *, gate_perm=None) -> None:
    """Copy our pinned-layout params into a torch nn.LSTM / nn.RNN (the mapping under test).

    gate_perm optionally permutes the gate blocks (only used to show a wrong mapping is caught).
    """

    def t(a):
        a = np.asarray(a)
        if gate_perm is not None:
            a = np.concatenate([np.split(a, 4, axis=-1)[j] for j in gate_perm], axis=-1)
        return torch.from_numpy(np.ascontiguousarray(a))

    with torch.no_grad():
        for name, p in params.items():
            s = torch_suffix(name)
            getattr(module, f"weight_ih_{s}").copy_(t(p["w_x"]).T)
            getattr(module, f"weight_hh_{s}").copy_(t(p["w_h"]).T)
            getattr(module, f"bias_ih_{s}").copy_(t(p["b"]))
            getattr(module, f"bias_hh_{s}").zero_()


def torch_param_grads(module, names) -> dict:
    """Gradients of the torch module's weights, mapped back to our layout."""
    grads = {}
    for name in names:
        s = torch_suffix(name)
        gi = getattr(module, f"bias_ih_{s}").grad.numpy()
        gh = getattr(module, f"bias_hh_{s}").grad.numpy()
        # b enters once through bias_ih and once through bias_hh: both get dL/db (torch sums them
        # in different orders, hence a tolerance).
        np.testing.assert_allclose(gi, gh, rtol=0, atol=TOL[str(gi.dtype)][1])
        grads[name] = {
            "w_x": getattr(module, f"weight_ih_{s}").grad.numpy().T,
            "w_h": getattr(module, f"weight_hh_{s}").grad.numpy().T,
            "b": gi,
        }
    return grads


def make_problem(rng, kind, num_layers, bidirectional, dtype, *, scan=False):
    """Inputs, initial carry and random cotangent weights for the scalar loss.

    scan=True gives carry [batch, hidden] (lstm_scan / rnn_scan); otherwise the modules' stacked
    [num_layers*directions, batch, hidden].
    """
    directions = 2 if bidirectional else 1
    state_shape = (BATCH, HIDDEN) if scan else (num_layers * directions, BATCH, HIDDEN)
    prob = {
        "xs": rng.standard_normal((BATCH, TIME, FEATURES)).astype(dtype),
        "h0": (0.5 * rng.standard_normal(state_shape)).astype(dtype),
        "r_out": rng.standard_normal((BATCH, TIME, directions * HIDDEN)).astype(dtype),
        "r_h": rng.standard_normal(state_shape).astype(dtype),
    }
    if kind == "lstm":
        prob["c0"] = (0.5 * rng.standard_normal(state_shape)).astype(dtype)
        prob["r_c"] = rng.standard_normal(state_shape).astype(dtype)
    return prob


def run_torch(
    kind,
    params,
    prob,
    *,
    num_layers=1,
    bidirectional=False,
    seq_lengths=None,
    flip=False,
    gate_perm=None,
):
    """PyTorch forward + backward of the same scalar loss. Returns numpy arrays.

    flip=True runs the (single-layer, unidirectional) network on the time-reversed input and
    flips the results back, which is what our ``reverse=True`` computes.
    """
    dtype = prob["xs"].dtype
    tdtype = {np.dtype("float32"): torch.float32, np.dtype("float64"): torch.float64}[dtype]
    cls = torch.nn.LSTM if kind == "lstm" else torch.nn.RNN
    module = cls(
        FEATURES,
        HIDDEN,
        num_layers=num_layers,
        batch_first=True,
        bidirectional=bidirectional,
        dtype=tdtype,
    )
    load_torch_weights(module, params, gate_perm=gate_perm)

    def maybe_flip(a):
        return np.ascontiguousarray(a[:, ::-1]) if flip else a

    scan = prob["h0"].ndim == 2
    x = torch.tensor(maybe_flip(prob["xs"]), requires_grad=True)
    h0 = torch.tensor(prob["h0"][None] if scan else prob["h0"], requires_grad=True)
    state = h0
    if kind == "lstm":
        c0 = torch.tensor(prob["c0"][None] if scan else prob["c0"], requires_grad=True)
        state = (h0, c0)
    if seq_lengths is None:
        out, final = module(x, state)
    else:
        packed = pack_padded_sequence(
            x,
            torch.as_tensor(seq_lengths, dtype=torch.int64),
            batch_first=True,
            enforce_sorted=False,
        )
        out, final = module(packed, state)
        out, _ = pad_packed_sequence(out, batch_first=True, total_length=TIME)
    h_n, c_n = final if kind == "lstm" else (final, None)
    if scan:
        h_n, c_n = h_n[0], (None if c_n is None else c_n[0])
    loss = (out * torch.from_numpy(maybe_flip(prob["r_out"]))).sum() + (
        h_n * torch.from_numpy(prob["r_h"])
    ).sum()
    if kind == "lstm":
        loss = loss + (c_n * torch.from_numpy(prob["r_c"])).sum()
    loss.backward()
    res = {
        "outputs": maybe_flip(out.detach().numpy()),
        "h_n": h_n.detach().numpy(),
        "d xs": maybe_flip(x.grad.numpy()),
        "d h0": h0.grad.numpy()[0] if scan else h0.grad.numpy(),
        "d params": torch_param_grads(module, params.keys()),
    }
    if kind == "lstm":
        res["c_n"] = c_n.detach().numpy()
        res["d c0"] = c0.grad.numpy()[0] if scan else c0.grad.numpy()
    return res


def run_jax(kind, params, prob, forward):
    """Our forward + jax.grad of the same scalar loss. forward(params, xs, carry) -> (final, outputs)."""

    def loss_fn(params, xs, carry):
        final, out = forward(params, xs, carry)
        h_n, c_n = final if kind == "lstm" else (final, None)
        loss = jnp.sum(out * prob["r_out"]) + jnp.sum(h_n * prob["r_h"])
        if kind == "lstm":
            loss = loss + jnp.sum(c_n * prob["r_c"])
        return loss, (out, h_n, c_n)

    carry = (prob["h0"], prob["c0"]) if kind == "lstm" else prob["h0"]
    grad_fn = jax.jit(jax.grad(loss_fn, argnums=(0, 1, 2), has_aux=True))
    (d_params, d_xs, d_carry), (out, h_n, c_n) = grad_fn(params, prob["xs"], carry)
    res = {"outputs": out, "h_n": h_n, "d xs": d_xs, "d params": d_params}
    if kind == "lstm":
        res["c_n"] = c_n
        res["d h0"], res["d c0"] = d_carry
    else:
        res["d h0"] = d_carry
    return jax.tree.map(np.asarray, res)


def compare(case, ours, theirs, dtype):
    tol_out, tol_grad = TOL[dtype]
    assert set(ours) == set(theirs)
    for quantity in sorted(ours):
        if quantity == "d params":
            assert set(ours[quantity]) == set(theirs[quantity])
            for name in ours[quantity]:
                for k in ("w_x", "w_h", "b"):
                    assert_close(
                        case,
                        "d params",
                        ours[quantity][name][k],
                        theirs[quantity][name][k],
                        tol_grad,
                    )
        else:
            tol = tol_grad if quantity.startswith("d ") else tol_out
            assert_close(case, quantity, ours[quantity], theirs[quantity], tol)


# ---------------------------------------------------------------------------------------------
# (a) single layer: lstm_scan / rnn_scan


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("kind", ["lstm", "rnn"])
def test_scan_matches_torch(kind, reverse, dtype):
    with x64(dtype):
        rng = np.random.default_rng(0)
        params = random_params(rng, kind, FEATURES, HIDDEN, dtype=dtype)
        prob = make_problem(rng, kind, 1, False, dtype, scan=True)
        scan = jaxmodels.lstm_scan if kind == "lstm" else jaxmodels.rnn_scan

        def forward(params, xs, carry):
            return scan(params["layer_0"], xs, carry, reverse=reverse)

        ours = run_jax(kind, params, prob, forward)
        theirs = run_torch(kind, params, prob, flip=reverse)
        assert ours["outputs"].dtype == np.dtype(dtype)
        compare(f"{kind}_scan {'reverse' if reverse else 'forward'} {dtype}", ours, theirs, dtype)


@pytest.mark.parametrize("kind", ["lstm", "rnn"])
def test_scan_zero_initial_carry_matches_torch(kind):
    """initial_carry=None is zeros, as torch's default."""
    rng = np.random.default_rng(1)
    params = random_params(rng, kind, FEATURES, HIDDEN)
    xs = rng.standard_normal((BATCH, TIME, FEATURES)).astype(np.float32)
    scan = jaxmodels.lstm_scan if kind == "lstm" else jaxmodels.rnn_scan
    final, out = scan(params["layer_0"], xs)
    module = (torch.nn.LSTM if kind == "lstm" else torch.nn.RNN)(FEATURES, HIDDEN, batch_first=True)
    load_torch_weights(module, params)
    with torch.no_grad():
        t_out, t_final = module(torch.from_numpy(xs))
    case = f"{kind}_scan zero carry float32"
    assert_close(case, "outputs", out, t_out.numpy(), TOL["float32"][0])
    if kind == "lstm":
        assert_close(case, "h_n", final[0], t_final[0][0].numpy(), TOL["float32"][0])
        assert_close(case, "c_n", final[1], t_final[1][0].numpy(), TOL["float32"][0])
    else:
        assert_close(case, "h_n", final, t_final[0].numpy(), TOL["float32"][0])


def test_wrong_gate_mapping_is_detected():
    """The comparison is sensitive: swapping the i and f blocks on the torch side must fail."""
    rng = np.random.default_rng(2)
    params = random_params(rng, "lstm", FEATURES, HIDDEN)
    prob = make_problem(rng, "lstm", 1, False, "float32", scan=True)
    _final, out = jaxmodels.lstm_scan(params["layer_0"], prob["xs"], (prob["h0"], prob["c0"]))
    theirs = run_torch("lstm", params, prob, gate_perm=(1, 0, 2, 3))
    assert np.max(np.abs(np.asarray(out) - theirs["outputs"])) > 1e-2


# ---------------------------------------------------------------------------------------------
# (b) Flax modules, stacked and bidirectional, full length


MODULE_CONFIGS = [(2, True), (2, False)]


def module_forward(kind, num_layers, bidirectional, seq_lengths=None):
    cls = jaxmodels.LSTM if kind == "lstm" else jaxmodels.SimpleRNN
    module = cls(hidden_size=HIDDEN, num_layers=num_layers, bidirectional=bidirectional)

    def forward(params, xs, carry):
        out, final = module.apply(
            {"params": params}, xs, seq_lengths=seq_lengths, initial_carry=carry
        )
        return final, out

    return module, forward


@pytest.mark.parametrize(
    "num_layers,bidirectional", MODULE_CONFIGS, ids=["2layer-bi", "2layer-uni"]
)
@pytest.mark.parametrize("kind", ["lstm", "rnn"])
def test_module_matches_torch(kind, num_layers, bidirectional):
    dtype = "float32"
    rng = np.random.default_rng(3)
    params = random_params(rng, kind, FEATURES, HIDDEN, num_layers, bidirectional)
    prob = make_problem(rng, kind, num_layers, bidirectional, dtype)
    module, forward = module_forward(kind, num_layers, bidirectional)
    # Our random params have exactly the structure and shapes the module initialises.
    init = jax.eval_shape(module.init, jax.random.key(0), prob["xs"])["params"]
    assert jax.tree.map(lambda a: a.shape, init) == jax.tree.map(np.shape, params)
    ours = run_jax(kind, params, prob, forward)
    theirs = run_torch(kind, params, prob, num_layers=num_layers, bidirectional=bidirectional)
    name = "LSTM" if kind == "lstm" else "SimpleRNN"
    compare(f"{name} {num_layers}L {'bi' if bidirectional else 'uni'} {dtype}", ours, theirs, dtype)


def test_module_float64_matches_torch():
    """A float64 check of the bidirectional 2-layer LSTM module (param_dtype float64)."""
    dtype = "float64"
    with x64(dtype):
        rng = np.random.default_rng(4)
        params = random_params(rng, "lstm", FEATURES, HIDDEN, 2, True, dtype=dtype)
        prob = make_problem(rng, "lstm", 2, True, dtype)
        module = jaxmodels.LSTM(
            hidden_size=HIDDEN, num_layers=2, bidirectional=True, param_dtype=jnp.float64
        )

        def forward(params, xs, carry):
            out, final = module.apply({"params": params}, xs, initial_carry=carry)
            return final, out

        ours = run_jax("lstm", params, prob, forward)
        theirs = run_torch("lstm", params, prob, num_layers=2, bidirectional=True)
        assert ours["outputs"].dtype == np.float64
        compare(f"LSTM 2L bi {dtype}", ours, theirs, dtype)


# ---------------------------------------------------------------------------------------------
# (c) variable lengths vs packed sequences


@pytest.mark.parametrize(
    "num_layers,bidirectional", [(1, False), (2, True)], ids=["1layer-uni", "2layer-bi"]
)
@pytest.mark.parametrize("kind", ["lstm", "rnn"])
def test_module_seq_lengths_match_packed_torch(kind, num_layers, bidirectional):
    dtype = "float32"
    rng = np.random.default_rng(5)
    params = random_params(rng, kind, FEATURES, HIDDEN, num_layers, bidirectional)
    prob = make_problem(rng, kind, num_layers, bidirectional, dtype)
    # Large values in the padding: they must not leak into anything.
    pad = np.arange(TIME)[None, :] >= SEQ_LENGTHS[:, None]
    prob["xs"] = np.where(pad[:, :, None], np.float32(50.0), prob["xs"]).astype(dtype)
    _, forward = module_forward(
        kind, num_layers, bidirectional, seq_lengths=jnp.asarray(SEQ_LENGTHS)
    )
    ours = run_jax(kind, params, prob, forward)
    theirs = run_torch(
        kind,
        params,
        prob,
        num_layers=num_layers,
        bidirectional=bidirectional,
        seq_lengths=SEQ_LENGTHS,
    )
    # Padded positions: zero outputs, zero input gradients, in both.
    assert np.all(theirs["outputs"][pad] == 0) and np.all(ours["outputs"][pad] == 0)
    assert np.all(theirs["d xs"][pad] == 0) and np.all(ours["d xs"][pad] == 0)
    name = "LSTM" if kind == "lstm" else "SimpleRNN"
    compare(
        f"{name} {num_layers}L {'bi' if bidirectional else 'uni'} packed {dtype}",
        ours,
        theirs,
        dtype,
    )


@pytest.mark.parametrize("kind", ["lstm", "rnn"])
def test_scan_seq_lengths_match_packed_torch(kind):
    """lstm_scan / rnn_scan directly, forward and reverse, against one bidirectional torch layer."""
    dtype = "float32"
    rng = np.random.default_rng(6)
    params = random_params(rng, kind, FEATURES, HIDDEN, 1, True)
    prob = make_problem(rng, kind, 1, True, dtype)
    scan = jaxmodels.lstm_scan if kind == "lstm" else jaxmodels.rnn_scan
    lengths = jnp.asarray(SEQ_LENGTHS)

    def forward(params, xs, carry):
        finals, outs = [], []
        for d, name in enumerate(("layer_0", "layer_0_reverse")):
            c = jax.tree.map(lambda a: a[d], carry)
            final, out = scan(params[name], xs, c, seq_lengths=lengths, reverse=bool(d))
            finals.append(final)
            outs.append(out)
        return jax.tree.map(lambda *a: jnp.stack(a), *finals), jnp.concatenate(outs, axis=-1)

    ours = run_jax(kind, params, prob, forward)
    theirs = run_torch(
        kind, params, prob, num_layers=1, bidirectional=True, seq_lengths=SEQ_LENGTHS
    )
    compare(f"{kind}_scan fwd+rev packed {dtype}", ours, theirs, dtype)
