"""Test-wide JAX settings: the CPU backend, strict dtype promotion, errors on implicit rank promotion.

The suite runs on the CPU (kernels interpreted) even where the accelerator compilers are installed
for tests/test_compile.py: JAX_PLATFORMS=cpu keeps the CUDA plugin from looking for a GPU, and
ALLOW_MULTIPLE_LIBTPU_LOAD lets processes of the suite (multi-host tests) each load libtpu.
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import jax

jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_numpy_rank_promotion", "raise")
