"""Task models and their registry: each a pair of pure functions ``init`` / ``apply``.

    >>> model = get_model("lstm-classifier", hidden_size=64, num_classes=10)
    >>> variables = model.init(jax.random.key(0), xs)         # xs [batch, time, features]
    >>> logits = model.apply(variables, xs)                   # [batch, num_classes]

Model code knows nothing of optimizers, data or checkpoints; ``task`` tells a trainer which loss
fits the outputs.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxmodels.layers import CNN, LSTM, SimpleRNN

Array = jax.Array

TASKS = ("classification", "regression", "language_model")


class SequenceModel(nn.Module):
    """A recurrent encoder (``cell`` "lstm" or "rnn") and a dense head on its final hidden state.

    xs [batch, time, features] (+ optional seq_lengths [batch]) -> [batch, num_outputs]: class
    logits for a classifier, values for a regressor. With ``bidirectional`` the head reads the last
    layer's forward and backward final states, concatenated.
    """

    num_outputs: int
    cell: str = "lstm"
    hidden_size: int = 128
    num_layers: int = 1
    bidirectional: bool = False
    dropout_rate: float = 0.0
    impl: str = "auto"
    dtype: Any = None

    @nn.compact
    def __call__(
        self, xs: Array, seq_lengths: Array | None = None, *, train: bool = False
    ) -> Array:
        encoder = _recurrent(self.cell)(
            self.hidden_size,
            self.num_layers,
            self.bidirectional,
            self.dropout_rate,
            self.impl,
            dtype=self.dtype,
        )
        _, final = encoder(xs, seq_lengths, train=train)
        h_n = final[0] if self.cell == "lstm" else final  # [layers*directions, batch, hidden]
        directions = 2 if self.bidirectional else 1
        last = jnp.concatenate(list(h_n[-directions:]), axis=-1)
        return nn.Dense(self.num_outputs, dtype=self.dtype)(last)


class CharLM(nn.Module):
    """Character language model: embedding - recurrent layers (``cell`` "lstm" or "rnn") - dense
    over the vocabulary.

    tokens [batch, time] integers in [0, vocab_size) -> logits [batch, time, vocab_size] for the
    next character at every step. With ``return_carry`` the call also returns the recurrent layers'
    final carry (stacked as ``LSTM`` / ``SimpleRNN`` return it), which ``initial_carry`` takes
    back: a text can be read in pieces, and ``generate`` feeds its samples one step at a time.
    """

    vocab_size: int
    embed_size: int = 64
    hidden_size: int = 256
    num_layers: int = 2
    cell: str = "lstm"
    dropout_rate: float = 0.0
    impl: str = "auto"
    dtype: Any = None

    @nn.compact
    def __call__(
        self,
        tokens: Array,
        initial_carry: Any = None,
        *,
        train: bool = False,
        return_carry: bool = False,
    ):
        if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
            raise ValueError(
                f"expected integer tokens of rank 2 [batch, time], got shape {tokens.shape} dtype {tokens.dtype}"
            )
        xs = nn.Embed(self.vocab_size, self.embed_size, dtype=self.dtype)(tokens)
        recurrent = _recurrent(self.cell)(
            self.hidden_size,
            self.num_layers,
            dropout_rate=self.dropout_rate,
            impl=self.impl,
            dtype=self.dtype,
        )
        hs, carry = recurrent(xs, None, initial_carry, train=train)
        hs = nn.Dropout(self.dropout_rate, deterministic=not train)(hs)
        logits = nn.Dense(self.vocab_size, dtype=self.dtype)(hs)
        return (logits, carry) if return_carry else logits


def _recurrent(cell: str) -> type[nn.Module]:
    cells = {"lstm": LSTM, "rnn": SimpleRNN}
    if cell not in cells:
        raise ValueError(f"expected cell to be one of {tuple(cells)}, got {cell!r}")
    return cells[cell]


@dataclasses.dataclass(frozen=True)
class Model:
    """A named Flax module seen as pure functions.

    ``init(key, example, **kw) -> variables`` and ``apply(variables, x, *, train=False, rng=None,
    **kw) -> outputs``; ``rng`` feeds dropout when ``train`` is True. Keyword arguments (such as
    ``seq_lengths``) go to the module's ``__call__``.
    """

    name: str
    task: str
    module: nn.Module

    def init(self, key: Array, example: Array, **kwargs) -> dict:
        params_key, dropout_key = jax.random.split(key)
        return self.module.init({"params": params_key, "dropout": dropout_key}, example, **kwargs)

    def apply(
        self, variables: dict, x: Array, *, train: bool = False, rng: Array | None = None, **kwargs
    ) -> Array:
        rngs = {"dropout": rng} if rng is not None else {}
        return self.module.apply(variables, x, train=train, rngs=rngs, **kwargs)


_REGISTRY: dict[str, tuple[str, Callable[..., nn.Module]]] = {
    "cnn": ("classification", CNN),
    "lstm-classifier": (
        "classification",
        lambda num_classes=10, **kw: SequenceModel(num_classes, cell="lstm", **kw),
    ),
    "rnn-classifier": (
        "classification",
        lambda num_classes=10, **kw: SequenceModel(num_classes, cell="rnn", **kw),
    ),
    "lstm-regressor": (
        "regression",
        lambda num_outputs=1, **kw: SequenceModel(num_outputs, cell="lstm", **kw),
    ),
    "rnn-regressor": (
        "regression",
        lambda num_outputs=1, **kw: SequenceModel(num_outputs, cell="rnn", **kw),
    ),
    "char-lstm": ("language_model", lambda vocab_size, **kw: CharLM(vocab_size, cell="lstm", **kw)),
    "char-rnn": ("language_model", lambda vocab_size, **kw: CharLM(vocab_size, cell="rnn", **kw)),
}


def list_models() -> tuple[str, ...]:
    """Names accepted by ``get_model``."""
    return tuple(_REGISTRY)


def get_model(name: str, **config) -> Model:
    """The registered model ``name``; ``config`` overrides its module's attributes
    (e.g. ``get_model("char-lstm", vocab_size=65, hidden_size=512)``)."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; expected one of {list_models()}")
    task, factory = _REGISTRY[name]
    try:
        module = factory(**config)
    except TypeError as err:
        raise TypeError(f"bad configuration for model {name!r}: {err}") from None
    return Model(name, task, module)


def generate(
    model: Model,
    variables: dict,
    prompt: Array,
    length: int,
    key: Array,
    *,
    temperature: float = 1.0,
) -> Array:
    """Sample ``length`` tokens that follow ``prompt`` from a character language model
    (``char-lstm``, ``char-rnn``).

    prompt: [batch, p] integer tokens, p >= 1. The prompt is read in one call; then each token is
    drawn from softmax(logits / temperature) (the most likely one when temperature is 0) and fed
    back for one step, the recurrent carry passed along (``lax.scan``). Compiled once per model,
    length, temperature and prompt shape, and reused by later calls. Returns [batch, length] int32
    tokens.
    """
    if model.task != "language_model":
        raise ValueError(
            f"expected a language model (task 'language_model'), got {model.name!r} ({model.task!r})"
        )
    prompt = jnp.asarray(prompt)
    if prompt.ndim != 2 or prompt.shape[1] < 1 or not jnp.issubdtype(prompt.dtype, jnp.integer):
        raise ValueError(
            f"expected an integer prompt [batch, p] with p >= 1, got shape {prompt.shape} dtype {prompt.dtype}"
        )
    if isinstance(length, bool) or not isinstance(length, int) or length < 1:
        raise ValueError(f"expected a positive integer length, got {length!r}")
    if not temperature >= 0:
        raise ValueError(f"expected temperature >= 0, got {temperature}")

    return _sampler(model, length, float(temperature))(variables, prompt, key)


@functools.lru_cache(maxsize=64)
def _sampler(model: Model, length: int, temperature: float):
    """generate's jitted sampling loop for one model, length and temperature."""

    def draw(logits: Array, key: Array) -> Array:
        if temperature == 0:
            return jnp.argmax(logits, axis=-1).astype(jnp.int32)
        return jax.random.categorical(key, logits.astype(jnp.float32) / temperature).astype(
            jnp.int32
        )

    @jax.jit
    def run(variables, prompt, key):
        logits, carry = model.apply(variables, prompt, return_carry=True)

        def step(state, key):
            carry, logits = state
            token = draw(logits, key)
            logits, carry = model.apply(
                variables, token[:, None], initial_carry=carry, return_carry=True
            )
            return (carry, logits[:, 0]), token

        _, tokens = jax.lax.scan(step, (carry, logits[:, -1]), jax.random.split(key, length))
        return tokens.T

    return run
