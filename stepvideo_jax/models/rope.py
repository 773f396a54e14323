"""3-D rotary position embedding of the Step-Video DiT.

Each head vector (head_dim = 128) is split into parts of (64, 32, 32) channels rotated by the token's
frame, row and column index. Within a part of width p, channels i and i + p/2 (i < p/2) form a pair
rotated by `pos * theta^(-2i/p)` ("rotate-half" layout). All heads share the rotation.

Positions are explicit (s, 3) int arrays, so a sequence shard can pass its own slice of the grid.
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp


def grid_positions(frames: int, height: int, width: int) -> jax.Array:
    """(f*h*w, 3) int32 (frame, row, column) of tokens ordered `(f h w)`."""
    f, h, w = jnp.meshgrid(jnp.arange(frames), jnp.arange(height), jnp.arange(width), indexing="ij")
    return jnp.stack([f.ravel(), h.ravel(), w.ravel()], axis=-1).astype(jnp.int32)


def rope_angles(positions: jax.Array, splits: Sequence[int], theta: float) -> list[jax.Array]:
    """Per part, float32 angles (s, p/2) = pos * theta^(-2i/p)."""
    out = []
    for axis, p in enumerate(splits):
        inv_freq = 1.0 / (theta ** (jnp.arange(0, p, 2, dtype=jnp.float32) / p))
        out.append(positions[:, axis].astype(jnp.float32)[:, None] * inv_freq[None, :])
    return out


def apply_rope(x: jax.Array, positions: jax.Array, splits: Sequence[int], theta: float = 10000.0
               ) -> jax.Array:
    """Rotate x (b, s, h, d) by positions (s, 3); returns x's dtype.

    As the official code, the angles are cast to x's dtype before cos/sin (in bf16 the angles
    themselves are rounded) and the rotation is computed in x's dtype.
    """
    if sum(splits) != x.shape[-1]:
        raise ValueError(f"RoPE splits {tuple(splits)} must sum to head_dim {x.shape[-1]}")
    parts, start = [], 0
    for p, ang in zip(splits, rope_angles(positions, splits, theta)):
        ang = ang.astype(x.dtype).astype(jnp.float32)
        cos = jnp.cos(ang).astype(x.dtype)[None, :, None, :]
        sin = jnp.sin(ang).astype(x.dtype)[None, :, None, :]
        x1, x2 = x[..., start:start + p // 2], x[..., start + p // 2:start + p]
        parts += [x1 * cos - x2 * sin, x2 * cos + x1 * sin]
        start += p
    return jnp.concatenate(parts, axis=-1)
