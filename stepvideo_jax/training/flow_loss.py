"""Flow-matching objective of Step-Video-T2V, in the sampler's convention.

t = 0 is noise, t = 1 is data: `x_t = (1 - t) * noise + t * x`, the target velocity is `x - noise`,
the loss is the plain mean squared error over every latent element, and the DiT receives t in [0, 1]
(it multiplies by 1000 itself). A model trained this way samples with the official Euler schedule
(`sampling/flow_matching.py`).

Training timestep distributions (the paper does not state its own; uniform is the default):
- "uniform": t ~ U(0, 1).
- "logit_normal": t = sigmoid(n), n ~ N(mean, std) (SD3's choice; mass in the middle).
- "shifted": the SD3 shift applied to the noise level exactly as the sampler does: u ~ U(0, 1) is a
  noise level, sigma = shift * u / (1 + (shift - 1) * u), t = 1 - sigma. shift > 1 favours noisy
  timesteps, matching the inference schedule's density (13.0 for the base model).
- "u_shaped": density a (exp(a t) + exp(a (1 - t))) / (2 (exp(a) - 1)) on [0, 1] (`u_shape_a` = a),
  mass at both ends: the reflow objective's (`training/reflow.py`; Lee et al. 2024's symmetric form,
  a = 5). Drawn as t = log(1 + v (exp(a) - 1)) / a (inverse CDF of exp(a t), v ~ U(0, 1)), mirrored to
  1 - t on a fair coin per draw.

Latents come from the VAE posterior moments, so every step draws a fresh sample
`x = mean + exp(logvar / 2) * eps`.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

TIMESTEP_DISTRIBUTIONS = ("uniform", "logit_normal", "shifted", "u_shaped")


def u_shaped_density(t, a: float = 5.0):
    """The "u_shaped" density at t in [0, 1] (numpy arrays); it integrates to 1."""
    t = np.asarray(t, np.float64)
    return a * (np.exp(a * t) + np.exp(a * (1.0 - t))) / (2.0 * np.expm1(a))


def sample_u_shaped(key: jax.Array, batch: int, a: float = 5.0) -> jax.Array:
    """(batch,) float32 draws of `u_shaped_density` (see the module docstring)."""
    if not a > 0:
        raise ValueError(f"u_shaped timesteps need u_shape_a > 0, got {a!r}")
    k_v, k_coin = jax.random.split(key)
    v = jax.random.uniform(k_v, (batch,), jnp.float32)
    t = jnp.log1p(v * jnp.expm1(jnp.float32(a))) / jnp.float32(a)
    return jnp.where(jax.random.bernoulli(k_coin, 0.5, (batch,)), 1.0 - t, t)


def check_timesteps(distribution: str, *, shift: float = 1.0, u_shape_a: float = 5.0) -> None:
    """A ValueError naming an unknown distribution (and the valid ones) or its bad parameter."""
    if distribution not in TIMESTEP_DISTRIBUTIONS:
        raise ValueError(f"unknown timestep distribution {distribution!r}; choose one of {TIMESTEP_DISTRIBUTIONS}")
    if distribution == "shifted" and not shift > 0:
        raise ValueError(f"shifted timesteps need shift > 0, got {shift!r}")
    if distribution == "u_shaped" and not u_shape_a > 0:
        raise ValueError(f"u_shaped timesteps need u_shape_a > 0, got {u_shape_a!r}")


def sample_timesteps(key: jax.Array, batch: int, distribution: str = "uniform", *,
                     logit_mean: float = 0.0, logit_std: float = 1.0, shift: float = 1.0,
                     u_shape_a: float = 5.0) -> jax.Array:
    """(batch,) float32 training timesteps in [0, 1] (t = 1 data); see the module docstring."""
    check_timesteps(distribution, shift=shift, u_shape_a=u_shape_a)
    if distribution == "uniform":
        return jax.random.uniform(key, (batch,), jnp.float32)
    if distribution == "logit_normal":
        return jax.nn.sigmoid(logit_mean + logit_std * jax.random.normal(key, (batch,), jnp.float32))
    if distribution == "shifted":
        u = jax.random.uniform(key, (batch,), jnp.float32)
        return 1.0 - shift * u / (1.0 + (shift - 1.0) * u)
    return sample_u_shaped(key, batch, u_shape_a)


def sample_posterior(key: jax.Array, mean: jax.Array, logvar: jax.Array) -> jax.Array:
    """A latent sample `mean + exp(logvar / 2) * eps` (b f c h w, float32)."""
    mean, logvar = mean.astype(jnp.float32), logvar.astype(jnp.float32)
    return mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape, jnp.float32)


def interpolate(x: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
    """`x_t = (1 - t) * noise + t * x`, t (b,) broadcast over the other axes."""
    tb = t.reshape((-1,) + (1,) * (x.ndim - 1)).astype(jnp.float32)
    return (1.0 - tb) * noise.astype(jnp.float32) + tb * x.astype(jnp.float32)


def velocity_target(x: jax.Array, noise: jax.Array) -> jax.Array:
    return x.astype(jnp.float32) - noise.astype(jnp.float32)


def flow_matching_loss(velocity_fn: Callable[[jax.Array, jax.Array], jax.Array], x: jax.Array,
                       noise: jax.Array, t: jax.Array) -> jax.Array:
    """Scalar MSE between `velocity_fn(x_t, t)` (float32 math) and `x - noise`.

    velocity_fn(x_t (b f c h w, float32), t (b,)) -> velocity of the same shape.
    """
    pred = velocity_fn(interpolate(x, noise, t), t).astype(jnp.float32)
    return jnp.mean(jnp.square(pred - velocity_target(x, noise)))


def drop_conditioning(key: jax.Array, cond: Mapping[str, jax.Array], negative: Mapping[str, jax.Array],
                      probability: float) -> dict[str, Any]:
    """Per row, replace every conditioning array by the negative/empty prompt's with `probability`.

    `cond` and `negative` hold the same keys (`y`, `y_mask`, `clip`); `negative` leaves have batch 1
    (one encoded prompt) or the batch of `cond`. Trains the unconditional branch used by CFG.
    """
    if set(cond) != set(negative):
        raise ValueError(f"negative conditioning keys {sorted(negative)} differ from {sorted(cond)}")
    b = next(iter(cond.values())).shape[0]
    drop = jax.random.uniform(key, (b,)) < probability
    out = {}
    for name, value in cond.items():
        neg = jnp.broadcast_to(negative[name].astype(value.dtype), value.shape)
        out[name] = jnp.where(drop.reshape((b,) + (1,) * (value.ndim - 1)), neg, value)
    return out
