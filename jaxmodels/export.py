"""Trained models as ``jax.export`` artifacts: a model's ``apply`` with its parameters inside,
serialized (StableHLO), with a symbolic batch size (and time length, for sequence and token
models), lowered for several platforms in one artifact.

    data = export_model(model, variables, input_shape=(28, 28, 1))     # bytes
    Path("cnn.jax").write_bytes(data)
    # elsewhere, with only jax installed:
    exported = jax.export.deserialize(Path("cnn.jax").read_bytes())
    logits = exported.call(images)              # images [any batch, 28, 28, 1] float32

``jaxmodels export`` writes one from a run's checkpoint. The recurrent models are exported with
``impl="scan"``: the ``lax.scan`` path runs on every platform, and the Pallas kernels' custom calls
(Triton, Mosaic) carry no serialization compatibility guarantee. Traced value checks are left
out: token ids outside a character model's vocabulary give NaN logits, as under ``jax.jit``.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax.experimental import checkify

from jaxmodels.nn.models import Model, model_kind

PLATFORMS = ("cpu", "cuda", "tpu")


def input_spec(model: Model, input_shape: Sequence[int], dtype=jnp.float32) -> jax.ShapeDtypeStruct:
    """The symbolic input of ``model`` for one example of shape ``input_shape``: images
    ``[b, *input_shape]``; sequences [b, t, features] (``input_shape`` = (time, features), time
    symbolic); tokens [b, t] int32. ``b`` and ``t`` are ``jax.export`` symbolic dimensions."""
    inputs = model_kind(model.name)[1]
    if inputs == "images":
        dims, dtype = ("b", *map(str, input_shape)), dtype
    elif inputs == "sequences":
        dims, dtype = ("b", "t", str(input_shape[-1])), dtype
    else:  # tokens
        dims, dtype = ("b", "t"), jnp.int32
    return jax.ShapeDtypeStruct(jax.export.symbolic_shape(", ".join(dims)), dtype)


def portable(model: Model) -> Model:
    """``model`` with the ``lax.scan`` recurrence (``impl="scan"``) where it has an ``impl``."""
    if not hasattr(model.module, "impl"):
        return model
    return Model(model.name, model.task, model.module.clone(impl="scan"))


def export_model(
    model: Model,
    variables: dict,
    input_shape: Sequence[int],
    *,
    dtype=jnp.float32,
    platforms: Sequence[str] = PLATFORMS,
) -> bytes:
    """The serialized ``jax.export`` artifact of ``x -> model.apply(variables, x)`` (inference,
    ``train=False``) over ``input_spec(model, input_shape, dtype)``, for ``platforms`` (a subset of
    PLATFORMS). ``variables`` become constants of the artifact (an example: the interop guide,
    docs/guides/interop.md).
    """
    unknown = [p for p in platforms if p not in PLATFORMS]
    if unknown or not platforms:
        raise ValueError(f"expected platforms among {PLATFORMS}, got {list(platforms)}")
    model = portable(model)
    # The traced value checks (token ids in the vocabulary) are checkify effects, which an artifact
    # cannot carry: checkify runs them here and the artifact leaves their flag out.
    checked = checkify.checkify(lambda x: model.apply(variables, x), errors=checkify.user_checks)
    apply = jax.jit(lambda x: checked(x)[1])
    exported = jax.export.export(apply, platforms=tuple(platforms))(
        input_spec(model, input_shape, dtype)
    )
    return exported.serialize()
