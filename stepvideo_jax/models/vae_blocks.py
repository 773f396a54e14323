"""Building blocks of the Step-Video Video-VAE v2. Activations are channel-last: `b t h w c`.

Every normalisation is the official version-2 GroupNorm *per frame* (32 groups over (h, w, c/32) of
each frame). Every 3-D convolution is causal in time: `kt - 1` frames are placed in front of its
input (zeros at the start of a chunk — the official causal zero padding — or the last input frames of
the previous time slab when a section is streamed, see `CausalHistory`), and it is zero padded by
`k // 2` on both sides in space. Kernels are stored `(kt, kh, kw, in, out)` (3-D), `(kh, kw, in,
out)` (2-D) and `(in, out)` (1x1x1, as `Linear`).
"""
from __future__ import annotations

from typing import Optional, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from stepvideo_jax.models.attention import attention
from stepvideo_jax.models.layers import Linear, fan_in_normal, ones, param, zeros

CHANNELS = ("vae_channels",)
POINTWISE = ("vae_channels", "vae_channels")
KERNEL_2D = ("conv_window", "conv_window", "vae_channels", "vae_channels")
KERNEL_3D = ("conv_window",) + KERNEL_2D


class CausalHistory:
    """Input frames that precede the current time slab, one entry per causal conv, in call order.

    A streamed section runs the same code on consecutive slabs of frames. Each causal conv takes its
    `kt - 1` frames of context from `past` (the previous slab's, or zeros when `past` is None: the
    start of a chunk) and records its own last `kt - 1` input frames in `new` for the next slab.
    Streaming is therefore exact: per-frame ops do not mix frames and causal convs only look back.
    """

    def __init__(self, past: Optional[Sequence[jax.Array]] = None):
        self.past = None if past is None else list(past)
        self.new: list[jax.Array] = []

    def prepend(self, x: jax.Array, n: int) -> jax.Array:
        """x (b t h w c) -> (b, n + t, h, w, c) with the context frames in front."""
        if self.past is None:
            prev = jnp.zeros((x.shape[0], n) + x.shape[2:], x.dtype)
        else:
            prev = self.past[len(self.new)].astype(x.dtype)
        xp = jnp.concatenate([prev, x], axis=1)
        self.new.append(xp[:, xp.shape[1] - n:])
        return xp


def group_norm(x: jax.Array, weight: jax.Array, bias: jax.Array, *, groups: int, eps: float) -> jax.Array:
    """Per-frame GroupNorm of x (b t h w c), statistics and affine in float32, result in x's dtype."""
    b, t, h, w, c = x.shape
    xf = x.astype(jnp.float32).reshape(b, t, h * w, groups, c // groups)
    mean = jnp.mean(xf, axis=(2, 4), keepdims=True)
    var = jnp.mean(jnp.square(xf - mean), axis=(2, 4), keepdims=True)
    y = ((xf - mean) * jax.lax.rsqrt(var + eps)).reshape(x.shape)
    return (y * weight.astype(jnp.float32) + bias.astype(jnp.float32)).astype(x.dtype)


class GroupNorm(nnx.Module):
    def __init__(self, channels: int, *, groups: int, eps: float, param_dtype=jnp.float32):
        if channels % groups:
            raise ValueError(f"GroupNorm: {channels} channels are not divisible into {groups} groups")
        self.groups, self.eps = groups, eps
        self.weight = param(None, ones, (channels,), CHANNELS, param_dtype)
        self.bias = param(None, zeros, (channels,), CHANNELS, param_dtype)

    def __call__(self, x: jax.Array, *, silu: bool = False) -> jax.Array:
        y = group_norm(x, self.weight[...], self.bias[...], groups=self.groups, eps=self.eps)
        return jax.nn.silu(y) if silu else y


class CausalConv3d(nnx.Module):
    """Causal 3-D convolution (see the module docstring); `stride` applies to (t, h, w)."""

    def __init__(self, cin: int, cout: int, kernel: int | tuple[int, int, int] = 3, *,
                 stride: int | tuple[int, int, int] = 1, dtype=jnp.float32, param_dtype=jnp.float32,
                 rngs: nnx.Rngs):
        kernel = (kernel,) * 3 if isinstance(kernel, int) else tuple(kernel)
        self.stride = (stride,) * 3 if isinstance(stride, int) else tuple(stride)
        self.kernel = param(rngs, fan_in_normal, kernel + (cin, cout), KERNEL_3D, param_dtype)
        self.bias = param(rngs, zeros, (cout,), CHANNELS, param_dtype)
        self.dtype = dtype

    def __call__(self, x: jax.Array, history: Optional[CausalHistory] = None) -> jax.Array:
        """x (b t h w cin) -> (b t' h' w' cout); `history` streams the time context (stride 1 only)."""
        kt, kh, kw = self.kernel[...].shape[:3]
        x = x.astype(self.dtype)
        if kt > 1:
            if history is None:
                x = jnp.pad(x, ((0, 0), (kt - 1, 0), (0, 0), (0, 0), (0, 0)))
            elif self.stride[0] != 1:
                raise ValueError("a time-strided causal conv cannot be streamed over time slabs")
            else:
                x = history.prepend(x, kt - 1)
        y = jax.lax.conv_general_dilated(
            x, self.kernel[...].astype(self.dtype), window_strides=self.stride,
            padding=((0, 0), (kh // 2, kh // 2), (kw // 2, kw // 2)),
            dimension_numbers=("NDHWC", "DHWIO", "NDHWC"))
        return y + self.bias[...].astype(self.dtype)


class Conv2d(nnx.Module):
    """2-D convolution applied to every frame; `padding` ((top, bottom), (left, right))."""

    def __init__(self, cin: int, cout: int, kernel: int = 3, *, stride: int = 1,
                 padding: tuple[tuple[int, int], tuple[int, int]] = ((1, 1), (1, 1)),
                 dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.stride, self.padding = stride, padding
        self.kernel = param(rngs, fan_in_normal, (kernel, kernel, cin, cout), KERNEL_2D, param_dtype)
        self.bias = param(rngs, zeros, (cout,), CHANNELS, param_dtype)
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        b, t, h, w, c = x.shape
        y = jax.lax.conv_general_dilated(
            x.astype(self.dtype).reshape(b * t, h, w, c), self.kernel[...].astype(self.dtype),
            window_strides=(self.stride, self.stride), padding=self.padding,
            dimension_numbers=("NHWC", "HWIO", "NHWC"))
        y = y + self.bias[...].astype(self.dtype)
        return y.reshape((b, t) + y.shape[1:])


def nearest_upsample(x: jax.Array, factors: tuple[int, int, int]) -> jax.Array:
    """Nearest-neighbour upsampling of x (b t h w c) by integer (t, h, w) factors."""
    b, t, h, w, c = x.shape
    ft, fh, fw = factors
    y = jnp.broadcast_to(x[:, :, None, :, None, :, None, :], (b, t, ft, h, fh, w, fw, c))
    return y.reshape(b, t * ft, h * fh, w * fw, c)


def space_time_to_depth(x: jax.Array) -> jax.Array:
    """(b t h w c) -> (b, (t+1)/2, h/2, w/2, 8c): one zero frame in front, then 2x2x2 blocks to channels
    with output channel `c*8 + dt*4 + dh*2 + dw` (the official `pixel_unshuffle_3d`)."""
    x = jnp.pad(x, ((0, 0), (1, 0), (0, 0), (0, 0), (0, 0)))
    b, t, h, w, c = x.shape
    x = x.reshape(b, t // 2, 2, h // 2, 2, w // 2, 2, c).transpose(0, 1, 3, 5, 7, 2, 4, 6)
    return x.reshape(b, t // 2, h // 2, w // 2, c * 8)


def depth_to_space_time(x: jax.Array) -> jax.Array:
    """(b t h w 8c) -> (b, 2t-1, 2h, 2w, c): the inverse channel order of `space_time_to_depth`,
    then the first frame dropped (the official `pixel_shuffle_3d`)."""
    b, t, h, w, c8 = x.shape
    x = x.reshape(b, t, h, w, c8 // 8, 2, 2, 2).transpose(0, 1, 5, 2, 6, 3, 7, 4)
    return x.reshape(b, 2 * t, 2 * h, 2 * w, c8 // 8)[:, 1:]


def channel_group_mean(x: jax.Array, out_channels: int) -> jax.Array:
    """Mean over groups of consecutive channels: (..., c) -> (..., out_channels)."""
    y = x.reshape(x.shape[:-1] + (out_channels, x.shape[-1] // out_channels))
    return jnp.mean(y.astype(jnp.float32), axis=-1).astype(x.dtype)


class ResnetBlock(nnx.Module):
    """`shortcut(x) + conv2(silu(GN2(conv1(silu(GN1(x))))))`; shortcut = 1x1x1 conv iff cin != cout."""

    def __init__(self, cin: int, cout: int, *, groups: int, eps: float, dtype, param_dtype, rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.norm1 = GroupNorm(cin, groups=groups, eps=eps, param_dtype=param_dtype)
        self.conv1 = CausalConv3d(cin, cout, 3, **kw)
        self.norm2 = GroupNorm(cout, groups=groups, eps=eps, param_dtype=param_dtype)
        self.conv2 = CausalConv3d(cout, cout, 3, **kw)
        self.nin_shortcut = Linear(cin, cout, axes=POINTWISE, **kw) if cin != cout else None

    def __call__(self, x: jax.Array, history: Optional[CausalHistory] = None) -> jax.Array:
        h = self.conv1(self.norm1(x, silu=True), history)
        h = self.conv2(self.norm2(h, silu=True), history)
        return (x if self.nin_shortcut is None else self.nin_shortcut(x)) + h


class AttentionBlock(nnx.Module):
    """`x + proj_out(attn(GN(x)))`: ONE head of dimension C over all t*h*w positions of a chunk in
    (t, h, w) raster order, causal over that flattened order (also within a frame), scale 1/sqrt(C).

    Memory-efficient through the project's `attention` entry point (blockwise / splash), so the
    (t h w)^2 scores (42,160^2 per chunk at 544x992) are never materialised.
    """

    def __init__(self, channels: int, *, groups: int, eps: float, dtype, param_dtype, rngs,
                 backend: Optional[str] = None):
        kw = dict(axes=POINTWISE, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.norm = GroupNorm(channels, groups=groups, eps=eps, param_dtype=param_dtype)
        self.q = Linear(channels, channels, **kw)
        self.k = Linear(channels, channels, **kw)
        self.v = Linear(channels, channels, **kw)
        self.proj_out = Linear(channels, channels, **kw)
        self.backend = backend

    def __call__(self, x: jax.Array) -> jax.Array:
        b, t, h, w, c = x.shape
        xn = self.norm(x)
        q, k, v = (m(xn).reshape(b, t * h * w, 1, c) for m in (self.q, self.k, self.v))
        o = attention(q, k, v, causal=True, backend=self.backend)
        return x + self.proj_out(o.reshape(b, t, h, w, c))


class Upsample2D(nnx.Module):
    """Per-frame nearest x2 in (h, w), then a 3x3 conv with padding 1."""

    def __init__(self, channels: int, *, dtype, param_dtype, rngs):
        self.conv = Conv2d(channels, channels, 3, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.conv(nearest_upsample(x, (1, 2, 2)))


class Upsample3D(nnx.Module):
    """Nearest x2 in (t, h, w), then the official `Res3DBlockUpsample` (no conv3):
    `h = GN2(conv2(silu(GN1(conv1(x)))))`, `out = silu(h + x) + x` (the residual enters twice)."""

    def __init__(self, channels: int, *, groups: int, eps: float, dtype, param_dtype, rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.conv1 = CausalConv3d(channels, channels, 3, **kw)
        self.norm1 = GroupNorm(channels, groups=groups, eps=eps, param_dtype=param_dtype)
        self.conv2 = CausalConv3d(channels, channels, 3, **kw)
        self.norm2 = GroupNorm(channels, groups=groups, eps=eps, param_dtype=param_dtype)

    @staticmethod
    def interpolate(x: jax.Array) -> jax.Array:
        return nearest_upsample(x, (2, 2, 2))

    def refine(self, x: jax.Array, history: Optional[CausalHistory] = None) -> jax.Array:
        """The residual block on the interpolated x."""
        h = self.norm1(self.conv1(x, history), silu=True)
        h = self.norm2(self.conv2(h, history))
        return jax.nn.silu(h + x) + x

    def __call__(self, x: jax.Array, history: Optional[CausalHistory] = None) -> jax.Array:
        return self.refine(self.interpolate(x), history)


class Level(nnx.Module):
    """One resolution level: resnet `blocks`, then `resample` (None, a 2-D or a 3-D resampler)."""

    def __init__(self, blocks: list[ResnetBlock], resample: Optional[nnx.Module]):
        self.blocks = nnx.List(blocks)
        self.resample = resample
