"""Flax NNX versions of ``layers.CNN``, ``layers.SimpleRNN`` and ``layers.LSTM``.

The same pure functions (``conv.conv_relu_pool``, ``cells.dense``, ``recurrent.lstm_scan`` /
``rnn_scan``) run on the same parameter layout: ``nnx.state(module, nnx.Param)`` has the tree of
the Linen module's ``variables["params"]`` (``layer_0``, ``layer_0_reverse``, ... each {"w_x",
"w_h", "b"}; ``Conv_k`` / ``Dense_k`` each {"kernel", "bias"}), so weights move between the two
exactly::

    import flax.nnx as nnx, jax, jax.numpy as jnp
    import jaxmodels as jm
    from jaxmodels.nnx import LSTM, from_linen, to_linen

    xs = jnp.ones((8, 100, 32))                            # [batch, time, features]
    lstm = LSTM(32, 64, num_layers=2, bidirectional=True, dropout_rate=0.1, rngs=nnx.Rngs(0))
    outputs, (h_n, c_n) = lstm(xs)                         # [8, 100, 128], h_n [4, 8, 64]
    outputs, _ = lstm(xs, train=True)                      # dropout between layers (stream 'dropout')
    variables = jm.LSTM(64, num_layers=2, bidirectional=True).init(jax.random.key(0), xs)
    from_linen(variables, lstm)                            # the Linen weights, in place
    assert jax.tree.all(jax.tree.map(lambda a, b: (a == b).all(), to_linen(lstm), variables))

Constructors take the Linen module's fields plus what NNX needs to make parameters eagerly: the
input size (``in_features``; for the CNN also ``image_size``, which fixes Dense_0's rows) and
``rngs``; the fields are kept as attributes of the same names. Calls mirror ``Module.apply``:
``train=True`` turns dropout on, as in Linen (a Python bool: under ``nnx.jit``, static or closed
over).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx, traverse_util
from flax.linen import initializers
from flax.linen.dtypes import promote_dtype

from jaxmodels.nn import cells, checks, conv, layers, recurrent

Array = jax.Array


class _Params(nnx.Module):
    """One Linen parameter subtree ({name: array}) as ``nnx.Param`` attributes of those names."""

    def __init__(self, params: Mapping[str, Array]):
        for name, value in params.items():
            setattr(self, name, nnx.Param(value))

    def arrays(self) -> dict[str, Array]:
        return {name: v[...] for name, v in vars(self).items() if isinstance(v, nnx.Param)}


class CNN(nnx.Module):
    """``layers.CNN`` as an NNX module: x [batch, height, width, in_features] -> [batch,
    num_classes]. ``CNN(rngs=nnx.Rngs(0))`` is the seed's network on 28x28x1 images.

    ``image_size`` (height, width) sets the flattened size Dense_0 reads; the other arguments are
    ``layers.CNN``'s fields. Padding is 'VALID' or 'SAME' for both ``conv_impl``s ("xla" runs
    ``conv.conv_relu_pool_reference``, the function of Linen's ``nn.Conv`` / ``nn.max_pool``).
    """

    def __init__(
        self,
        in_features: int = 1,
        *,
        image_size: tuple[int, int] = (28, 28),
        features: Sequence[int] = (32, 64, 64),
        kernel_size: tuple[int, int] = (3, 3),
        pool_after: Sequence[bool] = (True, True, False),
        pool_size: tuple[int, int] = (2, 2),
        padding: str = "VALID",
        dense_features: Sequence[int] = (64,),
        num_classes: int = 10,
        dropout_rate: float = 0.0,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        conv_impl: str = "patches",
        rngs: nnx.Rngs,
    ):
        self.in_features = checks.size("in_features", in_features)
        self.image_size = layers.pair("image_size", image_size)
        self.features, self.kernel_size, self.pool_after = features, kernel_size, pool_after
        self.pool_size, self.padding, self.dense_features = pool_size, padding, dense_features
        self.num_classes, self.dropout_rate, self.conv_impl = num_classes, dropout_rate, conv_impl
        self.dtype, self.param_dtype = dtype, param_dtype
        for name, value in layers.check_cnn_fields(self, any_xla_padding=False).items():
            setattr(self, name, value)
        layers.check_image_size(self, self.image_size, f"image_size={self.image_size}")
        self.dropout = nnx.Dropout(self.dropout_rate, rngs=rngs)
        lecun = initializers.lecun_normal()  # Linen's nn.Conv / nn.Dense defaults, zero biases

        def kernel_and_bias(shape: tuple[int, ...]) -> _Params:
            kernel = lecun(rngs.params(), shape, param_dtype)
            return _Params({"kernel": kernel, "bias": jnp.zeros(shape[-1:], param_dtype)})

        channels = self.in_features
        for k, width in enumerate(self.features):
            setattr(self, f"Conv_{k}", kernel_and_bias((*self.kernel_size, channels, width)))
            channels = width
        probe = jax.ShapeDtypeStruct((1, *self.image_size, self.in_features), param_dtype)
        width = jax.eval_shape(self.convolutions, probe).shape[-1]
        for k, out in enumerate((*self.dense_features, self.num_classes)):
            setattr(self, f"Dense_{k}", kernel_and_bias((width, out)))
            width = out

    def convolutions(self, x: Array) -> Array:
        """The conv + bias + ReLU (+ max-pool) blocks, flattened: x [batch, height, width,
        in_features] -> [batch, features after the last block]."""
        for k, pool in enumerate(self.pool_after):
            p = getattr(self, f"Conv_{k}")
            x, kernel, bias = promote_dtype(x, p.kernel[...], p.bias[...], dtype=self.dtype)
            block = {"patches": conv.conv_relu_pool, "xla": conv.conv_relu_pool_reference}
            pool = self.pool_size if pool else (1, 1)
            x = block[self.conv_impl](x, kernel, bias, pool=pool, padding=self.padding)
        return x.reshape(x.shape[0], -1)

    def __call__(self, x: Array, *, train: bool = False) -> Array:
        """x: [batch, height, width, in_features] floats, of ``image_size`` -> logits [batch,
        num_classes]. Dropout before each dense layer when ``train`` (rng stream 'dropout')."""
        x = jnp.asarray(x)
        layers.check_images(x, self.in_features, f"in_features={self.in_features}")
        image, x = x.shape, self.convolutions(x)
        if x.shape[-1] != self.Dense_0.kernel.shape[0]:
            raise ValueError(
                f"expected x of the image size the parameters were made for (Dense_0 reads "
                f"{self.Dense_0.kernel.shape[0]} features after the convolutions, as from "
                f"image_size={self.image_size}), got shape {image}, which gives {x.shape[-1]}"
            )
        last = len(self.dense_features)
        for k in range(last + 1):
            p = getattr(self, f"Dense_{k}")
            x = self.dropout(x, deterministic=not train)
            x, kernel, bias = promote_dtype(x, p.kernel[...], p.bias[...], dtype=self.dtype)
            activation = "identity" if k == last else jax.nn.relu
            x = cells.dense({"w": kernel, "b": bias}, x, activation)
        return x


class _Recurrent(nnx.Module):
    """Stacked, optionally bidirectional recurrence over ``in_features`` inputs; subclasses say
    which cell (``init_layer``, ``scan``)."""

    def __init__(
        self,
        in_features: int,
        hidden_size: int,
        *,
        num_layers: int = 1,
        bidirectional: bool = False,
        dropout_rate: float = 0.0,
        impl: str = "auto",
        unroll: int = 1,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.in_features = checks.size("in_features", in_features)
        self.hidden_size = checks.size("hidden_size", hidden_size)
        self.num_layers = checks.size("num_layers", num_layers)
        self.bidirectional, self.directions = bool(bidirectional), 2 if bidirectional else 1
        self.dropout_rate = checks.rate("dropout_rate", dropout_rate)
        self.impl, self.unroll, self.dtype, self.param_dtype = impl, unroll, dtype, param_dtype
        self.dropout = nnx.Dropout(self.dropout_rate, rngs=rngs)
        features = self.in_features
        for layer in range(self.num_layers):
            for direction in range(self.directions):
                params = self.init_layer(rngs.params(), features)
                setattr(self, f"layer_{layer}" + ("_reverse" if direction else ""), _Params(params))
            features = self.directions * self.hidden_size

    def init_layer(self, key: Array, features: int) -> dict:
        """One layer's parameters for ``features`` inputs, in the layout of ``cells.init_lstm`` /
        ``init_rnn``."""
        raise NotImplementedError

    def scan(self, params: dict, xs: Array, carry: Any, **options) -> tuple[Any, Array]:
        """The layer's scan, ``recurrent.lstm_scan`` or ``rnn_scan``, with ``options``."""
        raise NotImplementedError

    def __call__(
        self,
        xs: Array,
        initial_carry: Any = None,
        *,
        seq_lengths: Array | None = None,
        train: bool = False,
    ):
        """xs: [batch, time, in_features]; seq_lengths: [batch] or None (full length).

        Returns (outputs, final_carry) as ``layers.LSTM`` / ``SimpleRNN``: outputs [batch, time,
        directions*hidden] of the last layer; final_carry [num_layers*directions, batch, hidden]
        like PyTorch's h_n (a pair (h_n, c_n) for the LSTM), index layer*directions + direction;
        ``initial_carry`` in that form. Dropout between layers when ``train`` (stream 'dropout').
        """
        xs = checks.sequences(xs)
        if xs.shape[-1] != self.in_features:
            raise ValueError(
                f"expected xs [batch, time, features={self.in_features}], got shape {xs.shape}"
            )
        return layers.stacked_scans(
            self.scan,
            lambda name, _features: getattr(self, name).arrays(),
            lambda xs: self.dropout(xs, deterministic=not train),
            xs,
            initial_carry,
            num_layers=self.num_layers,
            directions=self.directions,
            dtype=self.dtype or checks.promote_types(xs.dtype, self.param_dtype),
            seq_lengths=seq_lengths,
            unroll=self.unroll,
            impl=self.impl,
        )


class SimpleRNN(_Recurrent):
    """``layers.SimpleRNN`` as an NNX module, over ``recurrent.rnn_scan``:
    ``SimpleRNN(in_features, hidden_size, *, num_layers, bidirectional, dropout_rate, impl, unroll,
    dtype, param_dtype, activation=jnp.tanh, rngs)``; returns (outputs, h_n) as ``LSTM`` does."""

    def __init__(
        self,
        in_features: int,
        hidden_size: int,
        *,
        activation: Callable[[Array], Array] | str = jnp.tanh,
        rngs: nnx.Rngs,
        **fields,
    ):
        self.activation = activation
        super().__init__(in_features, hidden_size, rngs=rngs, **fields)

    def init_layer(self, key, features):
        return cells.init_rnn(key, features, self.hidden_size, self.param_dtype)

    def scan(self, params, xs, carry, **options):
        return recurrent.rnn_scan(params, xs, carry, activation=self.activation, **options)


class LSTM(_Recurrent):
    """``layers.LSTM`` as an NNX module, over ``recurrent.lstm_scan``: ``LSTM(in_features,
    hidden_size, *, num_layers, bidirectional, dropout_rate, impl, unroll, dtype, param_dtype,
    forget_bias=1.0, rngs)``; returns (outputs, (h_n, c_n))."""

    def __init__(
        self,
        in_features: int,
        hidden_size: int,
        *,
        forget_bias: float = cells.FORGET_BIAS,
        rngs: nnx.Rngs,
        **fields,
    ):
        self.forget_bias = forget_bias
        super().__init__(in_features, hidden_size, rngs=rngs, **fields)

    def init_layer(self, key, features):
        return cells.init_lstm(
            key, features, self.hidden_size, forget_bias=self.forget_bias, dtype=self.param_dtype
        )

    def scan(self, params, xs, carry, **options):
        return recurrent.lstm_scan(params, xs, carry, **options)


# ---------------------------------------------------------------------------------------------
# Conversion


def from_linen(variables: Mapping[str, Any], module: nnx.Module) -> nnx.Module:
    """Put a Linen module's variables ({"params": ...}, e.g. ``layers.LSTM(...).init(...)``) into
    the NNX ``module`` of the same configuration, in place; returns ``module``. The arrays are
    stored as given (not copied or cast), so ``to_linen`` gives them back bitwise.

    Raises ValueError naming the paths missing or unexpected (other collections than "params"
    included) and, for a parameter of another shape, its path and both shapes.
    """
    if set(variables) != {"params"}:
        raise ValueError(f"expected variables with one collection 'params', got {list(variables)}")
    state = nnx.state(module, nnx.Param)
    ours = traverse_util.flatten_dict(nnx.to_pure_dict(state), sep="/")
    given = traverse_util.flatten_dict(variables["params"], sep="/")
    missing, unexpected = sorted(ours.keys() - given.keys()), sorted(given.keys() - ours.keys())
    if missing or unexpected:
        raise ValueError(
            f"expected the parameters of {type(module).__name__}; missing "
            f"{['params/' + p for p in missing]}, unexpected {['params/' + p for p in unexpected]}"
        )
    for path, value in given.items():
        if jnp.shape(value) != jnp.shape(ours[path]):
            raise ValueError(
                f"expected params/{path} of shape {jnp.shape(ours[path])} (the "
                f"{type(module).__name__}'s), got shape {jnp.shape(value)}"
            )
    nnx.replace_by_pure_dict(state, traverse_util.unflatten_dict(given, sep="/"))
    nnx.update(module, state)
    return module


def to_linen(module: nnx.Module) -> dict[str, dict]:
    """The Linen variables {"params": {...}} of an NNX ``module`` (nested dicts of its arrays,
    not copies), for the Linen module of the same configuration's ``apply``.
    """
    return {"params": nnx.to_pure_dict(nnx.state(module, nnx.Param))}
