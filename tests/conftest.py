"""Test-wide JAX settings: strict dtype promotion and errors on implicit rank promotion."""

import jax

jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_numpy_rank_promotion", "raise")
