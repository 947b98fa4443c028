"""Task models and their registry: each a pair of pure functions ``init`` / ``apply``.

    >>> import jax, jax.numpy as jnp
    >>> xs = jnp.ones((8, 20, 32))                            # [batch, time, features]
    >>> model = get_model("lstm-classifier", hidden_size=16, num_classes=10)
    >>> variables = model.init(jax.random.key(0), xs)
    >>> model.apply(variables, xs).shape                      # [batch, num_classes]
    (8, 10)

Model code knows nothing of optimizers, data or checkpoints; ``task`` tells a trainer which loss
fits the outputs.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxmodels.nn import checks
from jaxmodels.nn.layers import CNN, LSTM, SimpleRNN

Array = jax.Array

TASKS = ("classification", "regression", "language_model")


class SequenceModel(nn.Module):
    """A recurrent encoder (``cell`` "lstm" or "rnn") and a dense head on its final hidden state.

    xs [batch, time, features] (+ keyword seq_lengths [batch]) -> [batch, num_outputs]: class
    logits for a classifier, values for a regressor. With ``bidirectional`` the head reads the last
    layer's forward and backward final states, concatenated. Validated: num_outputs an integer
    >= 1 (a classifier's num_classes), the rest as in ``LSTM`` / ``SimpleRNN``.
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
        self, xs: Array, *, seq_lengths: Array | None = None, train: bool = False
    ) -> Array:
        checks.size("num_outputs (num_classes of a classifier)", self.num_outputs)
        encoder = _recurrent(self.cell)(
            self.hidden_size,
            self.num_layers,
            self.bidirectional,
            self.dropout_rate,
            self.impl,
            dtype=self.dtype,
        )
        _, final = encoder(xs, seq_lengths=seq_lengths, train=train)
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

    Validated: vocab_size and embed_size integers >= 1, dropout_rate in [0, 1] (the rest as in
    ``LSTM`` / ``SimpleRNN``); tokens of rank 2 with batch, time >= 1, integer, and in
    [0, vocab_size) when concrete. Traced (under ``jax.jit``) they raise only under
    ``jaxmodels.checked`` (see ``checks``); otherwise ids >= vocab_size or < -vocab_size give NaN
    logits, and ids in [-vocab_size, 0) read the embedding table from its end.
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
        vocab_size = checks.size("vocab_size", self.vocab_size)
        checks.size("embed_size", self.embed_size)
        checks.rate("dropout_rate", self.dropout_rate)
        tokens = jnp.asarray(tokens)
        if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
            raise ValueError(
                f"expected integer tokens of rank 2 [batch, time], got shape {tokens.shape} dtype {tokens.dtype}"
            )
        if any(size < 1 for size in tokens.shape):  # per size: symbolic ones (jax.export) too
            raise ValueError(
                f"expected at least one sequence and one time step, got tokens of shape "
                f"{tokens.shape} [batch, time]"
            )
        checks.in_range(tokens, 0, vocab_size - 1, f"tokens in [0, vocab_size={vocab_size})")
        xs = nn.Embed(self.vocab_size, self.embed_size, dtype=self.dtype)(tokens)
        recurrent = _recurrent(self.cell)(
            self.hidden_size,
            self.num_layers,
            dropout_rate=self.dropout_rate,
            impl=self.impl,
            dtype=self.dtype,
        )
        hs, carry = recurrent(xs, initial_carry, train=train)
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
        """The model's variables ({"params": ...}) for inputs like ``example`` [batch, ...]; ``key``
        seeds the parameters (and dropout, where the module draws at init)."""
        params_key, dropout_key = jax.random.split(key)
        return self.module.init({"params": params_key, "dropout": dropout_key}, example, **kwargs)

    def apply(
        self, variables: dict, x: Array, *, train: bool = False, rng: Array | None = None, **kwargs
    ) -> Array:
        """The model's outputs for ``x``: logits [batch, classes], predictions [batch, outputs] or
        token logits [batch, time, vocab] by ``task``. ``rng`` feeds dropout when ``train``."""
        rngs = {"dropout": rng} if rng is not None else {}
        return self.module.apply(variables, x, train=train, rngs=rngs, **kwargs)


class _Entry(NamedTuple):
    task: str  # "classification", "regression" or "language_model"
    inputs: str  # what it reads: "images", "sequences" or "tokens" (as data.DATASET_KINDS)
    module: type[nn.Module]  # the class factory builds
    factory: Callable[..., nn.Module]


_REGISTRY: dict[str, _Entry] = {
    "cnn": _Entry("classification", "images", CNN, CNN),
    "lstm-classifier": _Entry(
        "classification",
        "sequences",
        SequenceModel,
        lambda num_classes=10, **kw: SequenceModel(num_classes, cell="lstm", **kw),
    ),
    "rnn-classifier": _Entry(
        "classification",
        "sequences",
        SequenceModel,
        lambda num_classes=10, **kw: SequenceModel(num_classes, cell="rnn", **kw),
    ),
    "lstm-regressor": _Entry(
        "regression",
        "sequences",
        SequenceModel,
        lambda num_outputs=1, **kw: SequenceModel(num_outputs, cell="lstm", **kw),
    ),
    "rnn-regressor": _Entry(
        "regression",
        "sequences",
        SequenceModel,
        lambda num_outputs=1, **kw: SequenceModel(num_outputs, cell="rnn", **kw),
    ),
    "char-lstm": _Entry(
        "language_model",
        "tokens",
        CharLM,
        lambda vocab_size, **kw: CharLM(vocab_size, cell="lstm", **kw),
    ),
    "char-rnn": _Entry(
        "language_model",
        "tokens",
        CharLM,
        lambda vocab_size, **kw: CharLM(vocab_size, cell="rnn", **kw),
    ),
}


def list_models() -> tuple[str, ...]:
    """Names accepted by ``get_model``.

    Examples:
      >>> list_models()
      ('cnn', 'lstm-classifier', 'rnn-classifier', 'lstm-regressor', 'rnn-regressor', 'char-lstm', 'char-rnn')
    """
    return tuple(_REGISTRY)


def _entry(name: str) -> _Entry:
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; expected one of {list_models()}")
    return _REGISTRY[name]


def model_kind(name: str) -> tuple[str, str]:
    """(task, inputs) of the registered model ``name``, known without building it (a char model
    needs its data's vocab_size first): e.g. ("language_model", "tokens") for "char-lstm"."""
    entry = _entry(name)
    return entry.task, entry.inputs


# Module fields that are not a model's options: Flax's own, the cell its name fixes, the sizes its
# data sets, and the dtypes (the compute dtype is chosen on its own, e.g. by --dtype).
_NOT_OPTIONS = frozenset(
    {"parent", "name", "cell", "num_outputs", "num_classes", "vocab_size", "dtype", "param_dtype"}
)


def model_options(name: str) -> dict[str, Any]:
    """The options of the registered model ``name`` with their defaults: the fields of its module
    that ``get_model(name, **options)`` sets, less those its data sets (num_classes, num_outputs,
    vocab_size), its cell and dtypes. E.g. for "lstm-classifier": hidden_size 128, num_layers 1,
    bidirectional False, dropout_rate 0.0, impl "auto".

    Examples:
      >>> model_options("lstm-classifier")["hidden_size"]
      128
    """
    return {
        f.name: f.default
        for f in dataclasses.fields(_entry(name).module)
        if f.name not in _NOT_OPTIONS and f.default is not dataclasses.MISSING
    }


def options_of(model: Model) -> dict[str, Any]:
    """The values of ``model_options(model.name)`` in ``model`` (what a run records to rebuild it)."""
    return {key: getattr(model.module, key) for key in model_options(model.name)}


# The option each task's data sets (a classifier's classes, a regressor's outputs, a vocabulary).
DATA_SIZES = {"classification": "num_classes", "regression": "num_outputs"}
DATA_SIZES |= {"language_model": "vocab_size"}


def config_of(model: Model) -> dict[str, Any]:
    """What ``get_model(model.name, **config)`` rebuilds ``model`` from: ``options_of(model)`` and
    the size its data sets (``DATA_SIZES``), e.g. {"hidden_size": 128, ..., "num_classes": 10}."""
    module, size = model.module, DATA_SIZES[model.task]
    value = getattr(module, size) if hasattr(module, size) else module.num_outputs
    return options_of(model) | {size: value}


def tuples(value: Any) -> Any:
    """A config value read back from JSON as ``get_model`` takes it: JSON's lists (nested too) as
    the tuples they were written from (e.g. a CNN's features); other values as they are."""
    return tuple(map(tuples, value)) if isinstance(value, list) else value


def get_model(name: str, **config) -> Model:
    """The registered model ``name``; ``config`` overrides its module's attributes
    (e.g. ``get_model("char-lstm", vocab_size=65, hidden_size=512)``).

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> model = get_model("rnn-regressor", hidden_size=8)
      >>> xs = jnp.ones((2, 10, 2))
      >>> model.task, model.apply(model.init(jax.random.key(0), xs), xs).shape
      ('regression', (2, 1))
    """
    entry = _entry(name)
    try:
        module = entry.factory(**config)
    except TypeError as err:
        raise TypeError(f"bad configuration for model {name!r}: {err}") from None
    return Model(name, entry.task, module)


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
    tokens. A concrete prompt's tokens are checked against the vocabulary (as ``CharLM``'s).
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
    vocab_size = model.module.vocab_size
    checks.in_range(prompt, 0, vocab_size - 1, f"prompt tokens in [0, vocab_size={vocab_size})")
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
