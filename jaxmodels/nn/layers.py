"""Flax Linen modules: the seed's CNN, and multi-layer SimpleRNN / LSTM over ``recurrent``'s scans.

Recurrent parameters: one subtree per layer and direction, named ``layer_{k}`` (forward) and
``layer_{k}_reverse`` (backward, when bidirectional), each in the pinned layout
{"w_x", "w_h", "b"}, so ``lstm_scan(variables["params"]["layer_0"], xs)`` runs on it directly.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxmodels.nn import cells, checks, conv, recurrent

Array = jax.Array


CONV_IMPLS = ("patches", "xla")


class _ConvBlock(nn.Module):
    """maxpool(relu(conv(x) + bias)) over ``conv.conv_relu_pool``, with ``nn.Conv``'s parameters
    ("kernel" [kh, kw, in, features] and "bias" [features], created in that order with the same
    initialisers), so a ``CNN``'s variables are the same whichever ``conv_impl`` made them."""

    features: int
    kernel_size: tuple[int, int]
    pool: tuple[int, int]
    padding: str
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        kernel = self.param(
            "kernel",
            nn.linear.default_kernel_init,
            (*self.kernel_size, x.shape[-1], self.features),
            self.param_dtype,
        )
        bias = self.param("bias", nn.initializers.zeros_init(), (self.features,), self.param_dtype)
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        return conv.conv_relu_pool(x, kernel, bias, pool=self.pool, padding=self.padding)


class CNN(nn.Module):
    """Convolutional classifier. ``CNN()`` is the seed's Keras network on [batch, 28, 28, 1]:
    Conv(32,3x3,relu) - MaxPool(2) - Conv(64,3x3,relu) - MaxPool(2) - Conv(64,3x3,relu) - Flatten -
    Dense(64,relu) - Dense(10), 'VALID' padding, 93,322 parameters.

    Attributes:
      features: output channels of each convolution.
      kernel_size: (height, width) of every convolution.
      pool_after: for each convolution, whether a max-pool follows it.
      pool_size: (height, width) window and stride of the max-pools.
      padding: 'VALID' or 'SAME' for the convolutions.
      dense_features: widths of the hidden dense layers after flattening.
      num_classes: width of the output layer (logits).
      dropout_rate: dropout before each dense layer (only with ``train=True``), in [0, 1].
      conv_impl: how the convolution blocks are differentiated, one of ``CONV_IMPLS``; the same
        function and the same parameters either way.
        "patches" (default): each conv + bias + ReLU (+ max-pool) block is ``conv.conv_relu_pool``,
        whose backward pass (and the forward pass under differentiation) are patch matmuls with a
        hand-written backward: 2.5-4x faster training steps than "xla" at batch 32-512 on a
        2-core CPU (benchmarks/results/cnn.md); inference is the same program either way (XLA's
        own convolutions). Supports reverse-mode autodiff (``jax.grad``, ``jax.vjp``), not
        forward mode (``jax.jvp``, ``jax.jacfwd``).
        "xla": ``nn.Conv``, ``nn.relu`` and ``nn.max_pool``, differentiated by JAX (XLA's
        convolution gradients and ``select_and_scatter``).

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> cnn = CNN()
      >>> variables = jax.eval_shape(cnn.init, jax.random.key(0), jnp.zeros((1, 28, 28, 1)))
      >>> sum(x.size for x in jax.tree.leaves(variables))  # shapes only: nothing computed
      93322
      >>> jax.eval_shape(cnn.apply, variables, jnp.zeros((4, 28, 28, 1))).shape
      (4, 10)
    """

    features: Sequence[int] = (32, 64, 64)
    kernel_size: tuple[int, int] = (3, 3)
    pool_after: Sequence[bool] = (True, True, False)
    pool_size: tuple[int, int] = (2, 2)
    padding: str = "VALID"
    dense_features: Sequence[int] = (64,)
    num_classes: int = 10
    dropout_rate: float = 0.0
    dtype: Any = None
    param_dtype: Any = jnp.float32
    conv_impl: str = "patches"

    @nn.compact
    def __call__(self, x: Array, *, train: bool = False) -> Array:
        """x: [batch, height, width, channels] floats -> logits [batch, num_classes].

        Validated (ValueError / TypeError naming the expected value): the attributes (sizes
        integers >= 1, dropout_rate in [0, 1], conv_impl, padding, one pool_after per
        convolution); x's rank, dtype, batch >= 1 and height and width large enough for the
        convolutions and pools; with existing parameters, x's channels and image size.
        """
        x = jnp.asarray(x)
        check_cnn_fields(self, any_xla_padding=True)
        made = _made_shape(self, "Conv_0", "kernel")
        check_images(x, None if made is None else made[2], f"Conv_0's kernel {made} was made for")
        if self.padding in conv.PADDINGS:
            check_image_size(self, x.shape[1:3], f"shape {x.shape}")
        image = x.shape
        for k, (width, pool) in enumerate(zip(self.features, self.pool_after)):
            if self.conv_impl == "patches":
                x = _ConvBlock(
                    width,
                    tuple(self.kernel_size),
                    tuple(self.pool_size) if pool else (1, 1),
                    self.padding,
                    self.dtype,
                    self.param_dtype,
                    name=f"Conv_{k}",
                )(x)
                continue
            x = nn.Conv(
                width,
                self.kernel_size,
                padding=self.padding,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                name=f"Conv_{k}",
            )(x)
            x = nn.relu(x)
            if pool:
                x = nn.max_pool(x, self.pool_size, strides=self.pool_size)
        flat = x.reshape(x.shape[0], -1)
        made = _made_shape(self, "Dense_0", "kernel")
        if made is not None and made[0] != flat.shape[-1]:
            raise ValueError(
                f"expected x of the image size the parameters were made for (Dense_0 reads "
                f"{made[0]} features after the convolutions), got shape {image}, which gives "
                f"{flat.shape[-1]}"
            )
        x = flat
        for width in self.dense_features:
            x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
            x = nn.relu(nn.Dense(width, dtype=self.dtype, param_dtype=self.param_dtype)(x))
        x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
        return nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=self.param_dtype)(x)


def check_cnn_fields(cnn, *, any_xla_padding: bool) -> dict[str, Any]:
    """Validate the fields of a CNN, ``layers.CNN`` or ``nnx.CNN`` (read as attributes of ``cnn``):
    conv_impl in ``CONV_IMPLS``, one pool_after per convolution, sizes integers >= 1
    (kernel_size and pool_size pairs of them), dropout_rate in [0, 1], padding in
    ``conv.PADDINGS`` unless ``any_xla_padding`` and conv_impl is "xla" (Linen's ``nn.Conv`` takes
    more paddings; NNX's "xla" runs ``conv.conv_relu_pool_reference``, which does not).

    Returns the numeric fields normalised: features, kernel_size, pool_after, pool_size and
    dense_features as tuples of ints (bools for pool_after), num_classes an int, dropout_rate a
    float."""
    if cnn.conv_impl not in CONV_IMPLS:
        raise ValueError(f"expected conv_impl in {CONV_IMPLS}, got {cnn.conv_impl!r}")
    if len(cnn.pool_after) != len(cnn.features):
        raise ValueError(
            f"expected pool_after with one entry per convolution ({len(cnn.features)}), "
            f"got {len(cnn.pool_after)}"
        )
    if cnn.padding not in conv.PADDINGS and not (any_xla_padding and cnn.conv_impl == "xla"):
        raise ValueError(
            f"expected padding in {conv.PADDINGS} with conv_impl={cnn.conv_impl!r}, "
            f"got {cnn.padding!r}"
        )
    return {
        "features": tuple(checks.size(f"features[{k}]", w) for k, w in enumerate(cnn.features)),
        "dense_features": tuple(
            checks.size(f"dense_features[{k}]", w) for k, w in enumerate(cnn.dense_features)
        ),
        "num_classes": checks.size("num_classes", cnn.num_classes),
        "dropout_rate": checks.rate("dropout_rate", cnn.dropout_rate),
        "kernel_size": pair("kernel_size", cnn.kernel_size),
        "pool_size": pair("pool_size", cnn.pool_size),
        "pool_after": tuple(map(bool, cnn.pool_after)),
    }


def check_images(x: Array, channels: int | None, made_for: str) -> None:
    """x [batch, height, width, channels]: rank 4, floating point, batch >= 1, and ``channels``
    channels unless None (``made_for`` says what fixed that number, for the message)."""
    if x.ndim != 4:
        raise ValueError(
            f"expected x of rank 4 [batch, height, width, channels], got shape {x.shape}"
        )
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(
            f"expected floating-point x [batch, height, width, channels], got dtype {x.dtype}"
        )
    if x.shape[0] < 1:
        raise ValueError(
            f"expected at least one image (batch >= 1), got x of shape {x.shape} "
            "[batch, height, width, channels]"
        )
    if channels is not None and x.shape[3] != channels:
        raise ValueError(
            f"expected x [batch, height, width, channels={channels}] as {made_for}, "
            f"got shape {x.shape}"
        )


def check_image_size(cnn, size: tuple[int, int], given: str) -> None:
    """Images of ``size`` (height, width) large enough for the convolutions and pools of ``cnn``
    (a ``layers.CNN`` or ``nnx.CNN``, padding in ``conv.PADDINGS``): each 'VALID' k x k
    convolution takes k - 1 pixels, each p x p pool divides by p (rounding down) and every block
    must leave at least one pixel. ``given`` names the size in the message."""
    kernel, pool = pair("kernel_size", cnn.kernel_size), pair("pool_size", cnn.pool_size)
    least = [1, 1]  # the smallest output of the last block, walked back to the input
    for pooled in reversed(cnn.pool_after):
        for a in range(2):
            least[a] = least[a] * (pool[a] if pooled else 1)
            least[a] += kernel[a] - 1 if cnn.padding == "VALID" else 0
    if size[0] < least[0] or size[1] < least[1]:
        raise ValueError(
            f"expected images of at least {least[0]}x{least[1]} pixels for "
            f"{len(cnn.features)} {kernel[0]}x{kernel[1]} {cnn.padding} convolutions and "
            f"{sum(map(bool, cnn.pool_after))} {pool[0]}x{pool[1]} max-pools, got {given}"
        )


def pair(name: str, value) -> tuple[int, int]:
    """(height, width) of positive integers."""
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise ValueError(f"expected {name} to be (height, width), got {value!r}")
    return tuple(checks.size(f"{name}[{a}]", v) for a, v in enumerate(value))


def _made_shape(module: nn.Module, name: str, leaf: str) -> tuple[int, ...] | None:
    """The shape of the existing parameter params[name][leaf] of ``module`` (under ``apply``);
    None where it is not made yet (under ``init``)."""
    if not module.has_variable("params", name):
        return None
    made = module.get_variable("params", name).get(leaf)
    return None if made is None else jnp.shape(made)


class _Recurrent(nn.Module):
    """Stacked, optionally bidirectional recurrence; subclasses say which cell."""

    hidden_size: int
    num_layers: int = 1
    bidirectional: bool = False
    dropout_rate: float = 0.0
    impl: str = "auto"
    unroll: int = 1
    dtype: Any = None
    param_dtype: Any = jnp.float32

    def _init_layer(self, key: Array, features: int) -> dict:
        raise NotImplementedError

    def _scan(self, params: dict, xs: Array, carry: Any, **options) -> tuple[Any, Array]:
        """The layer's scan, ``recurrent.lstm_scan`` or ``rnn_scan``, with ``options``."""
        raise NotImplementedError

    @nn.compact
    def __call__(
        self,
        xs: Array,
        initial_carry: Any = None,
        *,
        seq_lengths: Array | None = None,
        train: bool = False,
    ):
        """xs: [batch, time, features]; seq_lengths: [batch] or None (full length).

        Returns (outputs, final_carry), as PyTorch's ``nn.LSTM`` / ``nn.RNN`` do: outputs [batch,
        time, directions*hidden] from the last layer (forward and backward halves concatenated);
        final_carry stacked like PyTorch's h_n, [num_layers*directions, batch, hidden] (a pair
        (h_n, c_n) for the LSTM), index layer*directions + direction. ``initial_carry`` has that
        same form (zeros when None). Dropout with ``dropout_rate`` is applied between layers when
        ``train`` is True (rng stream 'dropout').

        Validated (ValueError / TypeError naming the expected value): hidden_size and num_layers
        integers >= 1, dropout_rate in [0, 1]; xs floating point of rank 3 with batch, time >= 1,
        its features those layer_0 was made for (under ``apply``); the rest as in the scans
        (``recurrent.lstm_scan``), seq_lengths' values only when concrete.
        """
        checks.size("hidden_size", self.hidden_size)
        checks.size("num_layers", self.num_layers)
        checks.rate("dropout_rate", self.dropout_rate)
        xs = checks.sequences(xs)
        made = _made_shape(self, "layer_0", "w_x")
        if made is not None and made[0] != xs.shape[-1]:
            raise ValueError(
                f"expected xs [batch, time, features={made[0]}] as layer_0's w_x {made} was made "
                f"for, got shape {xs.shape}"
            )
        return stacked_scans(
            self._scan,
            lambda name, features: self.param(name, self._init_layer, features),
            lambda xs: nn.Dropout(self.dropout_rate, deterministic=not train)(xs),
            xs,
            initial_carry,
            num_layers=self.num_layers,
            directions=2 if self.bidirectional else 1,
            dtype=self.dtype or checks.promote_types(xs.dtype, self.param_dtype),
            seq_lengths=seq_lengths,
            unroll=self.unroll,
            impl=self.impl,
        )


def stacked_scans(
    scan: Callable[..., tuple[Any, Array]],
    layer: Callable[[str, int], dict],
    dropout: Callable[[Array], Array],
    xs: Array,
    initial_carry: Any,
    *,
    num_layers: int,
    directions: int,
    dtype: Any,
    **options,
) -> tuple[Array, Any]:
    """A stack of ``num_layers`` recurrent layers, each in ``directions`` (1, or 2: forward and
    backward), the loop of the Linen and the NNX modules.

    Layer k, direction d runs ``scan(params, inputs, carry, reverse=bool(d), **options)`` in
    ``dtype`` with params = ``layer(name, features)`` (name ``layer_{k}``, or
    ``layer_{k}_reverse`` for d = 1; features the inputs' last axis), inputs xs [batch, time,
    features] for k = 0 and ``dropout`` of the previous layer's outputs [batch, time,
    directions*hidden] (directions concatenated) after, carry ``initial_carry``'s entry
    k*directions + d (a pytree of [num_layers*directions, batch, hidden] arrays, or None).

    Returns (outputs of the last layer [batch, time, directions*hidden], the final carries
    stacked in that same form as ``initial_carry``).
    """
    finals = []
    for k in range(num_layers):
        if k > 0:
            xs = dropout(xs)
        outs = []
        for direction in range(directions):
            name = f"layer_{k}" + ("_reverse" if direction else "")
            params = jax.tree.map(lambda p: p.astype(dtype), layer(name, xs.shape[-1]))
            index = k * directions + direction
            carry = jax.tree.map(lambda a, i=index: a[i].astype(dtype), initial_carry)
            final, hs = scan(params, xs.astype(dtype), carry, reverse=bool(direction), **options)
            finals.append(final)
            outs.append(hs)
        xs = outs[0] if directions == 1 else jnp.concatenate(outs, axis=-1)
    return xs, jax.tree.map(lambda *a: jnp.stack(a), *finals)


class SimpleRNN(_Recurrent):
    """Elman RNN, h_t = f(x_t W + h_{t-1} U + b), over ``recurrent.rnn_scan``.

    Attributes: hidden_size, num_layers, bidirectional, dropout_rate (between layers), impl
    ("auto", "scan" or "pallas"; see ``rnn_scan``), unroll, dtype (computation), param_dtype,
    activation (f, tanh by default: a callable or a name in ``kernels.common.ACTIVATIONS``;
    impl="pallas" takes the names and their functions only).

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> rnn = SimpleRNN(hidden_size=5, activation="relu")
      >>> xs = jnp.ones((2, 7, 3))
      >>> outputs, h_n = rnn.apply(rnn.init(jax.random.key(0), xs), xs)
      >>> outputs.shape, h_n.shape
      ((2, 7, 5), (1, 2, 5))
    """

    activation: Callable[[Array], Array] | str = jnp.tanh

    def _init_layer(self, key, features):
        return cells.init_rnn(key, features, self.hidden_size, self.param_dtype)

    def _scan(self, params, xs, carry, **options):
        return recurrent.rnn_scan(params, xs, carry, activation=self.activation, **options)


class LSTM(_Recurrent):
    """LSTM (gates i, f, g, o) over ``recurrent.lstm_scan``; carry (h, c).

    Attributes: hidden_size, num_layers, bidirectional, dropout_rate (between layers), impl
    ("auto", "scan" or "pallas"; see ``lstm_scan``), unroll, dtype (computation), param_dtype,
    forget_bias (initial forget-gate bias, 1.0 by default).

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> lstm = LSTM(hidden_size=5, num_layers=2, bidirectional=True)
      >>> xs = jnp.ones((2, 7, 3))
      >>> variables = jax.jit(lstm.init)(jax.random.key(0), xs)
      >>> sorted(variables["params"])
      ['layer_0', 'layer_0_reverse', 'layer_1', 'layer_1_reverse']
      >>> outputs, (h_n, c_n) = lstm.apply(variables, xs)  # PyTorch's layout
      >>> outputs.shape, h_n.shape, c_n.shape
      ((2, 7, 10), (4, 2, 5), (4, 2, 5))
    """

    forget_bias: float = cells.FORGET_BIAS

    def _init_layer(self, key, features):
        return cells.init_lstm(
            key, features, self.hidden_size, forget_bias=self.forget_bias, dtype=self.param_dtype
        )

    def _scan(self, params, xs, carry, **options):
        return recurrent.lstm_scan(params, xs, carry, **options)
