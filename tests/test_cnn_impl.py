"""``CNN(conv_impl=...)``: the patch-matmul blocks (``jaxmodels.nn.conv``) against XLA's convolutions.

The reference is independent of the code under test: ``lax.conv_general_dilated``, ReLU and
``lax.reduce_window`` max differentiated by JAX autodiff (``select_and_scatter`` for the pool),
and, for the module, ``nn.Conv`` / ``nn.relu`` / ``nn.max_pool`` (``conv_impl="xla"``). Outputs and
gradients (input, kernel, bias; every parameter of the module) must agree within float32 rounding,
on 'VALID' and 'SAME' padding, non-square kernels and pools, pools that drop a remainder, and
several input channels. Strides other than 1 are not an option of ``CNN`` and so not tested.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmodels import CNN
from jaxmodels.nn import conv, layers

RTOL = ATOL = 1e-5  # float32, relative to each gradient's scale (see _close)


def _normal(shape, seed):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def _close(actual, expected, what):
    scale = max(float(np.max(np.abs(expected))), 1.0)
    np.testing.assert_allclose(
        np.asarray(actual), np.asarray(expected), rtol=RTOL, atol=ATOL * scale, err_msg=what
    )


# ---------------------------------------------------------------------------------------------
# The block: conv_relu_pool against conv_relu_pool_reference

# (x shape, kernel (kh, kw), features, pool, padding)
BLOCKS = [
    ((3, 28, 28, 1), (3, 3), 8, (2, 2), "VALID"),  # the seed's first block
    ((2, 13, 13, 6), (3, 3), 5, (2, 2), "VALID"),  # odd size: the pool drops the last row/column
    ((2, 5, 5, 4), (3, 3), 6, (1, 1), "VALID"),  # no pool: plain im2col
    ((2, 11, 12, 3), (2, 3), 5, (3, 2), "VALID"),  # non-square kernel and pool
    ((2, 10, 9, 2), (5, 4), 3, (2, 3), "SAME"),  # even kernel: XLA's uneven 'SAME' split
    ((1, 7, 7, 2), (1, 1), 3, (2, 2), "VALID"),  # 1x1 kernel
]  # (and 'SAME' 3x3 and 5x5 blocks, 3x3 pools inside the CNNs below)


@functools.partial(jax.jit, static_argnames=("pool", "padding"))
def _both(x, kernel, bias, cotangent, *, pool, padding):
    """(reference, patches), each (output, (dx, dkernel, dbias)) under jax.vjp, and both outputs
    without differentiation; one compilation."""
    results = []
    for fn in (conv.conv_relu_pool_reference, conv.conv_relu_pool):
        out, vjp = jax.vjp(lambda x, k, b: fn(x, k, b, pool=pool, padding=padding), x, kernel, bias)
        results.append((out, vjp(cotangent), fn(x, kernel, bias, pool=pool, padding=padding)))
    return results


@pytest.mark.parametrize(
    "shape, ksize, features, pool, padding",
    BLOCKS,
    ids=[f"{s}-k{k}-p{p}-{pad}" for s, k, _, p, pad in BLOCKS],
)
def test_block_matches_reference(shape, ksize, features, pool, padding):
    x = _normal(shape, 0)
    kernel = _normal((*ksize, shape[-1], features), 1) / np.sqrt(ksize[0] * ksize[1] * shape[-1])
    bias = 0.3 * _normal((features,), 2)  # some windows all negative: their gradient is zero
    out_shape = jax.eval_shape(
        functools.partial(conv.conv_relu_pool_reference, pool=pool, padding=padding),
        x,
        kernel,
        bias,
    ).shape
    (ref_out, ref_grads, ref_plain), (out, grads, plain) = _both(
        x, kernel, bias, _normal(out_shape, 3), pool=pool, padding=padding
    )
    assert out.shape == ref_out.shape and out.dtype == jnp.float32
    _close(out, ref_out, "output under differentiation")
    for name, g, r in zip(("x", "kernel", "bias"), grads, ref_grads):
        assert g.shape == r.shape and g.dtype == r.dtype, name
        _close(g, r, f"gradient of {name}")
    np.testing.assert_array_equal(
        plain, ref_plain
    )  # not differentiated, the block is XLA's own ops


def test_block_gradient_goes_to_the_first_maximum_of_a_tied_window():
    # a 1x1 identity kernel: the convolution is x itself, so windows of equal values tie exactly
    x = jnp.asarray(
        np.array(
            [
                [1.0, 1.0, 0.5, 2.0],
                [1.0, 0.5, 2.0, 2.0],
                [-1.0, -1.0, 3.0, 0.0],
                [-1.0, -1.0, 0.0, 3.0],
            ],
            np.float32,
        )[None, :, :, None]
    )
    kernel, bias = jnp.ones((1, 1, 1, 1), jnp.float32), jnp.zeros((1,), jnp.float32)
    cotangent = jnp.ones((1, 2, 2, 1), jnp.float32)
    (ref_out, ref_grads, _), (out, grads, _) = _both(
        x, kernel, bias, cotangent, pool=(2, 2), padding="VALID"
    )
    np.testing.assert_array_equal(out, ref_out)
    expected_dx = np.zeros((4, 4), np.float32)
    expected_dx[0, 0] = expected_dx[0, 3] = expected_dx[2, 2] = (
        1.0  # first max; all-negative window: none
    )
    np.testing.assert_array_equal(
        ref_grads[0][0, :, :, 0], expected_dx
    )  # what XLA's select_and_scatter does
    for g, r in zip(grads, ref_grads):
        np.testing.assert_array_equal(g, r)


@pytest.mark.parametrize(
    "bad, match",
    [
        (dict(padding="CIRCULAR"), "expected padding in"),
        (dict(pool=(0, 2)), "expected pool"),
        (dict(x=jnp.zeros((4, 4, 1))), "expected x of rank 4"),
        (dict(kernel=jnp.zeros((3, 3, 2, 4))), "expected kernel"),
        (dict(bias=jnp.zeros((5,))), "expected bias"),
        (dict(x=jnp.zeros((1, 3, 3, 1))), "large enough"),
    ],
)
def test_block_rejects_bad_arguments(bad, match):
    args = dict(
        x=jnp.zeros((1, 8, 8, 1)),
        kernel=jnp.zeros((3, 3, 1, 4)),
        bias=jnp.zeros((4,)),
        pool=(2, 2),
        padding="VALID",
    )
    args.update(bad)
    with pytest.raises(ValueError, match=match):
        conv.conv_relu_pool(args.pop("x"), args.pop("kernel"), args.pop("bias"), **args)


# ---------------------------------------------------------------------------------------------
# The module: CNN(conv_impl="patches") against CNN(conv_impl="xla")

CNN_CASES = [
    dict(),  # the seed CNN
    dict(padding="SAME"),
    dict(
        height=16,
        width=20,
        channels=3,
        features=(4, 8, 8),
        kernel_size=(5, 5),
        pool_after=(False, True, True),
        padding="SAME",
        num_classes=3,
    ),
    dict(
        height=18,
        width=20,
        channels=2,
        features=(4, 6),
        kernel_size=(3, 5),
        pool_after=(True, False),
        pool_size=(3, 3),
        dense_features=(9,),
    ),
]


def _numpy_variables(model, x):
    """Variables in ``model.init``'s structure drawn in numpy (kernels N(0, 1/fan_in), small
    biases): a jitted ``init`` takes seconds to compile (test_parameters_are_the_same checks init)."""
    shapes = jax.eval_shape(model.init, jax.random.key(0), x)
    rng = np.random.default_rng(1)

    def draw(leaf):
        scale = 0.1 if leaf.ndim == 1 else 1 / np.sqrt(np.prod(leaf.shape[:-1]))
        return jnp.asarray(rng.standard_normal(leaf.shape) * scale, leaf.dtype)

    return jax.tree.map(draw, shapes)


@functools.cache
def _case(case: int):
    """(variables, (loss, logits, grads) per impl, inference logits per impl) for CNN_CASES[case]."""
    config = dict(CNN_CASES[case])
    shape = (3, config.pop("height", 28), config.pop("width", 28), config.pop("channels", 1))
    models = {impl: CNN(**config, conv_impl=impl) for impl in layers.CONV_IMPLS}
    x = _normal(shape, 4)
    variables = _numpy_variables(models["xla"], x)
    labels = jnp.arange(shape[0]) % config.get("num_classes", 10)

    @jax.jit
    def run(variables, x):
        out = {}
        for impl, model in models.items():

            def loss(variables):
                logits = model.apply(variables, x)
                return -jnp.mean(
                    jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], axis=1)
                ), logits

            (value, logits), grads = jax.value_and_grad(loss, has_aux=True)(variables)
            out[impl] = (value, logits, grads, model.apply(variables, x))
        return out

    return variables, run(variables, x)


def test_conv_impls_are_listed_and_patches_is_the_default():
    assert layers.CONV_IMPLS == ("patches", "xla")
    assert CNN().conv_impl == "patches"


def test_parameters_are_the_same_whichever_impl():
    # the pinned layout (Flax Conv kernels [kh, kw, in, out], Dense params) and the same initial
    # values from the same key; a small CNN, since a jitted init compiles slowly
    x = jax.ShapeDtypeStruct((2, 28, 28, 1), jnp.float32)
    shapes = {
        impl: jax.eval_shape(CNN(conv_impl=impl).init, jax.random.key(0), x)
        for impl in layers.CONV_IMPLS
    }
    assert jax.tree.structure(shapes["patches"]) == jax.tree.structure(shapes["xla"])
    assert jax.tree.map(lambda a: (a.shape, a.dtype), shapes["patches"]) == jax.tree.map(
        lambda a: (a.shape, a.dtype), shapes["xla"]
    )
    assert list(shapes["patches"]["params"]) == ["Conv_0", "Conv_1", "Conv_2", "Dense_0", "Dense_1"]
    small = dict(features=(3,), pool_after=(True,), dense_features=())
    x = jnp.zeros((1, 6, 6, 2), jnp.float32)
    init = jax.jit(
        lambda key: {impl: CNN(**small, conv_impl=impl).init(key, x) for impl in layers.CONV_IMPLS}
    )
    values = init(jax.random.key(7))
    jax.tree.map(np.testing.assert_array_equal, values["patches"], values["xla"])


@pytest.mark.parametrize(
    "case", range(len(CNN_CASES)), ids=lambda c: ",".join(map(str, CNN_CASES[c].items())) or "seed"
)
def test_cnn_impls_agree(case):
    _, out = _case(case)
    loss, logits, grads, infer = out["patches"]
    xla_loss, xla_logits, xla_grads, xla_infer = out["xla"]
    _close(logits, xla_logits, "logits under differentiation")
    _close(loss, xla_loss, "loss")
    np.testing.assert_allclose(
        infer, xla_infer, rtol=1e-6, atol=1e-6
    )  # inference: XLA's ops either way
    for path, g in jax.tree_util.tree_leaves_with_path(grads):
        r = functools.reduce(lambda t, k: t[k.key], path, xla_grads)
        _close(g, r, f"gradient {jax.tree_util.keystr(path)}")


def test_cnn_patches_on_bfloat16_compute():
    small = dict(
        features=(4, 8), pool_after=(True, False), dense_features=(16,), dtype=jnp.bfloat16
    )
    x = _normal((2, 12, 12, 1), 5)
    variables = _numpy_variables(CNN(**small), x)

    @jax.jit
    def grads(variables):
        return {
            impl: jax.grad(
                lambda v: CNN(**small, conv_impl=impl).apply(v, x).astype(jnp.float32).sum()
            )(variables)
            for impl in layers.CONV_IMPLS
        }

    got = grads(variables)
    for g, r in zip(jax.tree.leaves(got["patches"]), jax.tree.leaves(got["xla"])):
        assert g.dtype == r.dtype == jnp.float32
        np.testing.assert_allclose(g, r, rtol=0.1, atol=0.05 * max(float(np.max(np.abs(r))), 1.0))


def test_cnn_rejects_unknown_conv_impl_and_padding():
    x = jnp.zeros((1, 28, 28, 1))
    with pytest.raises(
        ValueError, match=r"expected conv_impl in \('patches', 'xla'\), got 'cudnn'"
    ):
        jax.eval_shape(CNN(conv_impl="cudnn").init, jax.random.key(0), x)
    with pytest.raises(ValueError, match="expected padding in"):
        jax.eval_shape(CNN(padding="CIRCULAR").init, jax.random.key(0), x)
    jax.eval_shape(
        CNN(padding="CIRCULAR", conv_impl="xla").init, jax.random.key(0), x
    )  # nn.Conv's paddings
