"""Shared layers. Every parameter carries logical `axes` metadata (see `parallel/rules.py`).

Kernels are stored (in, out) — the transpose of PyTorch's `nn.Linear.weight` — so `y = x @ kernel`.
`dtype` is the compute dtype (activations, matmuls); `param_dtype` the storage dtype. Norm statistics
are always computed in float32.
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import qwix
from flax import nnx

Axes = tuple[str | None, ...]


def param(rngs: nnx.Rngs | None, init, shape: Sequence[int], axes: Axes, dtype=jnp.float32) -> nnx.Param:
    """An `nnx.Param` with logical axes; `rngs=None` for deterministic initialisers (ones/zeros)."""
    if len(axes) != len(shape):
        raise ValueError(f"axes {axes} do not match shape {tuple(shape)}")
    key = rngs.params() if rngs is not None else jax.random.key(0)
    return nnx.Param(init(key, tuple(shape), dtype), axes=tuple(axes))


def ones(key, shape, dtype):
    return jnp.ones(shape, dtype)


def zeros(key, shape, dtype):
    return jnp.zeros(shape, dtype)


def fan_in_normal(key, shape, dtype):
    """N(0, 1/fan_in) with fan_in = prod(shape[:-1]) (kernels are (..., in, out))."""
    fan_in = 1
    for s in shape[:-1]:
        fan_in *= s
    return (jax.random.normal(key, shape, jnp.float32) / jnp.sqrt(fan_in)).astype(dtype)


class Linear(nnx.Module):
    """`y = x @ kernel (+ bias)`; kernel (in, out) with logical axes `axes`.

    Weight-only quantised (`models/quant.py`): `kernel` holds int8 / float8_e4m3fn values and
    `kernel_scale` (1, out) their per-output-channel scale; the product goes through qwix's
    quantised `dot_general`, which dequantises the weight (in the compute dtype) before a float
    matmul. Unquantised, `kernel_scale` is None.
    """

    def __init__(self, din: int, dout: int, *, axes: Axes, use_bias: bool = True,
                 dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.kernel = param(rngs, fan_in_normal, (din, dout), axes, param_dtype)
        self.kernel_scale = nnx.data(None)
        self.bias = param(rngs, zeros, (dout,), (axes[1],), param_dtype) if use_bias else None
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.astype(self.dtype)
        if self.kernel_scale is None:
            y = jnp.dot(x, self.kernel[...].astype(self.dtype))
        else:
            w = qwix.QArray(self.kernel[...], self.kernel_scale[...].astype(self.dtype))
            y = qwix.dot_general(x, w, (((x.ndim - 1,), (0,)), ((), ())))
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y


def layer_norm(x: jax.Array, weight=None, bias=None, *, eps: float) -> jax.Array:
    """LayerNorm over the last axis, statistics in float32, result in x's dtype."""
    xf = x.astype(jnp.float32)
    mean = jnp.mean(xf, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
    y = (xf - mean) * jax.lax.rsqrt(var + eps)
    if weight is not None:
        y = y * weight.astype(jnp.float32)
    if bias is not None:
        y = y + bias.astype(jnp.float32)
    return y.astype(x.dtype)


def rms_norm(x: jax.Array, weight, *, eps: float) -> jax.Array:
    """`x * rsqrt(mean(x^2) + eps)` in float32, cast back to x's dtype, then `* weight`.

    The cast-before-weight order is the official code's (`self._norm(x.float()).type_as(x) * w`).
    """
    xf = x.astype(jnp.float32)
    y = (xf * jax.lax.rsqrt(jnp.mean(jnp.square(xf), axis=-1, keepdims=True) + eps)).astype(x.dtype)
    return y * weight.astype(x.dtype)


class LayerNorm(nnx.Module):
    """LayerNorm over the last axis with optional affine weight/bias (axes `("norm",)`)."""

    def __init__(self, dim: int, *, eps: float, affine: bool = True, param_dtype=jnp.float32):
        self.eps = eps
        self.weight = param(None, ones, (dim,), ("norm",), param_dtype) if affine else None
        self.bias = param(None, zeros, (dim,), ("norm",), param_dtype) if affine else None

    def __call__(self, x):
        return layer_norm(x, None if self.weight is None else self.weight[...],
                          None if self.bias is None else self.bias[...], eps=self.eps)


class RMSNorm(nnx.Module):
    """RMSNorm over the last axis with a weight (axes `("norm",)`)."""

    def __init__(self, dim: int, *, eps: float, param_dtype=jnp.float32):
        self.eps = eps
        self.weight = param(None, ones, (dim,), ("norm",), param_dtype)

    def __call__(self, x):
        return rms_norm(x, self.weight[...], eps=self.eps)
