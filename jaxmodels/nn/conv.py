"""Convolution + bias + ReLU (+ max-pool) as patch matmuls with a hand-written backward.

    conv_relu_pool(x, kernel, bias, pool=(ph, pw)) = maxpool_{ph x pw}(relu(conv(x, kernel) + bias))

with a 'VALID' or 'SAME' stride-1 convolution and a non-overlapping max-pool (window = stride,
'VALID': rows and columns that do not fill a window are dropped), the blocks of ``layers.CNN``.
Shapes: x [batch, height, width, channels], kernel [kh, kw, channels, features] (Flax's layout),
bias [features], result [batch, height_out // ph, width_out // pw, features].

Why: on CPU, XLA runs this block fast forward (a whole CNN becomes one fused library call) but
slowly backward: the max-pool gradient (``select_and_scatter``) and the convolution's weight
gradient take most of a training step. Here, under differentiation:

- Pooled-window patches. Output pixel (ph·p + d, pw·q + e) of pool window (p, q) reads input rows
  ph·p + u, u = d + i < ph + kh - 1, so the input is reshaped to blocks of ph x pw pixels,
  z[p, q, (r, s, c)] = x[ph·p + r, pw·q + s, c], and the patches of all the window's outputs are
  the A x B neighbouring blocks (A = ceil((ph + kh - 1) / ph)): X [batch·P·Q, A·B·ph·pw·channels].
  One matmul Y = X · W_big, W_big [A·B·ph·pw·channels, ph·pw·features] holding the kernel at each
  window offset (zeros elsewhere), gives every convolution output that a pool window reads, already
  grouped by window: the max-pool is a max over one axis and the bias and ReLU act on pooled values
  (max(y) + b = max(y + b) exactly, ReLU is monotone). Without a pool (1 x 1) this is plain
  im2col, X [batch·H·W, kh·kw·channels].
- Backward, all matmuls: δY = δP routed to the first maximum of each window (the element
  ``select_and_scatter`` picks) from a comparison with the saved Y; δW_big = Xᵀ · δY folded onto
  the kernel; δX = δY · W_bigᵀ scattered back onto the input blocks (col2im: A·B shifted adds).
- The primal function (no differentiation, e.g. inference) stays XLA's convolution and
  ``reduce_window`` max, which XLA fuses well.

The cost is extra multiply-adds on zeros, (ph + kh - 1)(pw + kw - 1) / (kh·kw) times the
convolution's (16/9 for 3x3 kernels and 2x2 pools), traded for matmul-shaped work. Forward-mode
differentiation (``jax.jvp``, ``jacfwd``) does not apply to a ``custom_vjp``; use the reference.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

Array = jax.Array

PADDINGS = ("VALID", "SAME")
_DIMENSION_NUMBERS = ("NHWC", "HWIO", "NHWC")


# ---------------------------------------------------------------------------------------------
# Public functions


def conv_relu_pool(
    x: Array, kernel: Array, bias: Array, *, pool: tuple[int, int] = (1, 1), padding: str = "VALID"
) -> Array:
    """maxpool(relu(conv(x, kernel) + bias)), differentiated through patch matmuls.

    Args:
      x: [batch, height, width, channels], floating point.
      kernel: [kh, kw, channels, features].
      bias: [features].
      pool: (ph, pw) window and stride of the max-pool; (1, 1) for none.
      padding: 'VALID' or 'SAME' (stride-1 convolution; for 'SAME' an odd padding row or column
        goes to the high side, as in XLA and Flax).

    Returns:
      [batch, height_out // ph, width_out // pw, features], height_out = height - kh + 1 for
      'VALID' and height for 'SAME'. The same values as ``conv_relu_pool_reference`` up to float
      rounding; gradients with respect to x, kernel and bias through ``jax.grad`` / ``jax.vjp``.
    """
    x, pool = _check(x, kernel, bias, pool, padding)
    x = _pad(x, kernel.shape, padding)
    return _conv_relu_pool(x, kernel, bias, (tuple(x.shape), tuple(kernel.shape), pool))


def conv_relu_pool_reference(
    x: Array, kernel: Array, bias: Array, *, pool: tuple[int, int] = (1, 1), padding: str = "VALID"
) -> Array:
    """The spec: XLA's convolution, ReLU and ``reduce_window`` max, differentiated by JAX."""
    x, pool = _check(x, kernel, bias, pool, padding)
    return _reference(_pad(x, kernel.shape, padding), kernel, bias, pool)


# ---------------------------------------------------------------------------------------------
# Checks and padding


def _check(x, kernel, bias, pool, padding):
    if padding not in PADDINGS:
        raise ValueError(f"expected padding in {PADDINGS}, got {padding!r}")
    if jnp.ndim(x) != 4:
        raise ValueError(
            f"expected x of rank 4 [batch, height, width, channels], got shape {jnp.shape(x)}"
        )
    if jnp.ndim(kernel) != 4 or kernel.shape[2] != x.shape[3]:
        raise ValueError(
            f"expected kernel [kh, kw, channels={x.shape[3]}, features], got shape {jnp.shape(kernel)}"
        )
    if jnp.shape(bias) != kernel.shape[3:]:
        raise ValueError(f"expected bias [features={kernel.shape[3]}], got shape {jnp.shape(bias)}")
    if not (x.dtype == kernel.dtype == bias.dtype) or not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(
            f"expected x, kernel and bias of one floating-point dtype, got {x.dtype}, {kernel.dtype}, {bias.dtype}"
        )
    pool = tuple(int(p) for p in pool)
    if len(pool) != 2 or min(pool) < 1:
        raise ValueError(f"expected pool (ph, pw) of positive integers, got {pool}")
    out = (
        x.shape[1:3]
        if padding == "SAME"
        else (x.shape[1] - kernel.shape[0] + 1, x.shape[2] - kernel.shape[1] + 1)
    )
    if out[0] < pool[0] or out[1] < pool[1]:
        raise ValueError(
            f"expected x [batch, height, width, channels] large enough for a {kernel.shape[0]}x{kernel.shape[1]} "
            f"{padding} convolution and a {pool[0]}x{pool[1]} pool, got shape {x.shape}"
        )
    return x, pool


def _pad(x: Array, kernel_shape, padding: str) -> Array:
    """x padded so that a 'VALID' convolution gives ``padding``'s output (XLA's 'SAME' split)."""
    if padding == "VALID":
        return x
    pads = lax.padtype_to_pads(x.shape[1:3], kernel_shape[:2], (1, 1), padding)
    return jnp.pad(x, ((0, 0), *pads, (0, 0)))


# ---------------------------------------------------------------------------------------------
# The block: reference primal, patch-matmul forward and backward


def _reference(x, kernel, bias, pool):
    y = lax.conv_general_dilated(x, kernel, (1, 1), "VALID", dimension_numbers=_DIMENSION_NUMBERS)
    y = jax.nn.relu(y + bias.reshape(1, 1, 1, -1))
    if pool == (1, 1):
        return y
    return lax.reduce_window(y, -jnp.inf, lax.max, (1, *pool, 1), (1, *pool, 1), "VALID")


class _Geometry:
    """Sizes of one block on a 'VALID'-padded x: P x Q pool windows, A x B input blocks of
    ph x pw pixels per window."""

    def __init__(self, geometry):
        x_shape, kernel_shape, pool = geometry
        self.batch, self.height, self.width, self.channels = x_shape
        self.kh, self.kw, _, self.features = kernel_shape
        self.ph, self.pw = pool
        self.P = (self.height - self.kh + 1) // self.ph
        self.Q = (self.width - self.kw + 1) // self.pw
        self.A = -(-(self.ph + self.kh - 1) // self.ph)
        self.B = -(-(self.pw + self.kw - 1) // self.pw)
        self.windows = self.ph * self.pw  # convolution outputs per pool window

    @property
    def block_rows(self):  # input rows / columns the patches read, a whole number of blocks
        return self.ph * (self.P + self.A - 1), self.pw * (self.Q + self.B - 1)


@functools.cache
def _placement(kh, kw, ph, pw, A, B) -> np.ndarray:
    """E[a, b, r, s, d, e, i, j] = 1 where input pixel (ph·a + r, pw·b + s) of a window's blocks
    meets kernel tap (i, j) for the window's output (d, e): ph·a + r = d + i, pw·b + s = e + j."""
    E = np.zeros((A, B, ph, pw, ph, pw, kh, kw), np.float32)
    for a, b, r, s, d, e in np.ndindex(A, B, ph, pw, ph, pw):
        i, j = ph * a + r - d, pw * b + s - e
        if 0 <= i < kh and 0 <= j < kw:
            E[a, b, r, s, d, e, i, j] = 1
    return E


def _big_kernel(kernel, g: _Geometry) -> Array:
    """W_big [A·B·ph·pw·channels, ph·pw·features]: the kernel placed at every window offset."""
    E = jnp.asarray(_placement(g.kh, g.kw, g.ph, g.pw, g.A, g.B), kernel.dtype)
    w = jnp.einsum("abrsdeij,ijco->abrscdeo", E, kernel)
    return w.reshape(g.A * g.B * g.windows * g.channels, g.windows * g.features)


def _patches(x, g: _Geometry) -> Array:
    """X [batch·P·Q, A·B·ph·pw·channels]: each pool window's A x B input blocks, features ordered
    (a, b, r, s, channel)."""
    rows, cols = g.block_rows
    x = x[:, :rows, :cols]
    if x.shape[1] < rows or x.shape[2] < cols:  # a window's blocks reach past the input: zeros
        x = jnp.pad(x, ((0, 0), (0, rows - x.shape[1]), (0, cols - x.shape[2]), (0, 0)))
    z = x
    if g.windows > 1:
        z = x.reshape(g.batch, rows // g.ph, g.ph, cols // g.pw, g.pw, g.channels)
        z = z.transpose(0, 1, 3, 2, 4, 5).reshape(
            g.batch, rows // g.ph, cols // g.pw, g.windows * g.channels
        )
    blocks = [z[:, a : a + g.P, b : b + g.Q, :] for a in range(g.A) for b in range(g.B)]
    patches = blocks[0] if len(blocks) == 1 else jnp.concatenate(blocks, axis=-1)
    return patches.reshape(g.batch * g.P * g.Q, -1)


def _col2im(d_patches, g: _Geometry) -> Array:
    """The transpose of ``_patches``: [batch·P·Q, A·B·ph·pw·channels] -> [batch, height, width, channels]."""
    rows, cols = g.block_rows
    d = d_patches.reshape(g.batch, g.P, g.Q, g.A, g.B, g.windows * g.channels)
    dz = None
    for a in range(g.A):
        for b in range(g.B):
            part = jnp.pad(
                d[:, :, :, a, b, :], ((0, 0), (a, g.A - 1 - a), (b, g.B - 1 - b), (0, 0))
            )
            dz = part if dz is None else dz + part
    if g.windows > 1:
        dz = dz.reshape(g.batch, rows // g.ph, cols // g.pw, g.ph, g.pw, g.channels)
        dz = dz.transpose(0, 1, 3, 2, 4, 5).reshape(g.batch, rows, cols, g.channels)
    dz = dz[:, : g.height, : g.width]
    return jnp.pad(dz, ((0, 0), (0, g.height - dz.shape[1]), (0, g.width - dz.shape[2]), (0, 0)))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _conv_relu_pool(x, kernel, bias, geometry):
    """geometry: (x shape, kernel shape, pool), static."""
    return _reference(x, kernel, bias, geometry[2])


def _forward(x, kernel, bias, geometry):
    g = _Geometry(geometry)
    patches = _patches(x, g)
    y = jnp.dot(patches, _big_kernel(kernel, g))  # [batch·P·Q, ph·pw·features]
    if g.windows > 1:
        y = y.reshape(-1, g.windows, g.features)
        # an elementwise max (NaN-propagating, as XLA's reduce_window max under autodiff), not a
        # reduction, which XLA's CPU library call computes without propagating NaN
        pooled = functools.reduce(jnp.maximum, [y[:, k, :] for k in range(g.windows)])
    else:
        pooled = y
    out = jax.nn.relu(pooled + bias[None, :])
    return out.reshape(g.batch, g.P, g.Q, g.features), (patches, y, pooled, out, kernel)


def _backward(geometry, residuals, d_out):
    patches, y, pooled, out, kernel = residuals
    g = _Geometry(geometry)
    zero = jnp.zeros((), d_out.dtype)
    d_pooled = jnp.where(out > 0, d_out.reshape(out.shape), zero)  # ReLU'(0) = 0, as jax.nn.relu
    d_bias = jnp.sum(d_pooled, axis=0)
    if g.windows > 1:
        # the gradient goes to the first maximum of each window, in row-major window order
        taken, parts = None, []
        for k in range(g.windows):
            hit = y[:, k, :] == pooled
            hit = hit if taken is None else hit & ~taken
            taken = hit if taken is None else taken | hit
            parts.append(jnp.where(hit, d_pooled, zero))
        d_y = jnp.stack(parts, axis=1).reshape(-1, g.windows * g.features)
    else:
        d_y = d_pooled
    d_big = jnp.dot(patches.T, d_y).reshape(
        g.A, g.B, g.ph, g.pw, g.channels, g.ph, g.pw, g.features
    )
    E = jnp.asarray(_placement(g.kh, g.kw, g.ph, g.pw, g.A, g.B), kernel.dtype)
    d_kernel = jnp.einsum("abrsdeij,abrscdeo->ijco", E, d_big)
    d_x = _col2im(jnp.dot(d_y, _big_kernel(kernel, g).T), g)
    return d_x, d_kernel, d_bias


_conv_relu_pool.defvjp(_forward, _backward)
