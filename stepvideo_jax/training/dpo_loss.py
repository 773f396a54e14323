"""Video-DPO (Diffusion-DPO adapted to Step-Video's flow matching), as pure functions.

For a pair (x_w preferred, x_l rejected) sharing ONE noise and ONE t:
`x_t^k = (1 - t) noise + t x^k`, target `v^k = x^k - noise`; per-sample mean squared velocity errors
e^k of the policy and e_ref^k of the frozen reference;
`margin = (e_ref^w - e^w) - (e_ref^l - e^l)` (how much more the policy improved on the preferred
sample than on the rejected one, relative to the reference), and
`loss = -log sigmoid((beta_t / 2) * margin)` with `beta_t = beta` or `beta * t^2`.
A pair counts as correctly ranked (implicit reward accuracy) only when `margin > 0`.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

BETA_SCHEDULES = ("constant", "t_squared")


def velocity_error(pred: jax.Array, target: jax.Array) -> jax.Array:
    """Per-sample mean squared error over every non-batch axis, float32: (b, ...) -> (b,)."""
    d = pred.astype(jnp.float32) - target.astype(jnp.float32)
    return jnp.mean(jnp.square(d), axis=tuple(range(1, d.ndim)))


def dpo_loss(err_w, err_l, ref_err_w, ref_err_l, t, *, beta: float, beta_schedule: str = "constant",
             sft_weight: float = 0.0):
    """Mean DPO loss over pairs and its metrics; every input is (b,) (errors from `velocity_error`).

    `sft_weight` adds `sft_weight * mean(err_w)`: plain flow matching on the preferred sample.
    """
    if beta_schedule not in BETA_SCHEDULES:
        raise ValueError(f"unknown beta_schedule {beta_schedule!r}; choose one of {BETA_SCHEDULES}")
    ref_err_w = jax.lax.stop_gradient(ref_err_w)
    ref_err_l = jax.lax.stop_gradient(ref_err_l)
    margin = (ref_err_w - err_w) - (ref_err_l - err_l)
    beta_t = beta * (jnp.square(t.astype(jnp.float32)) if beta_schedule == "t_squared" else 1.0)
    per_pair = -jax.nn.log_sigmoid(0.5 * beta_t * margin)
    loss = jnp.mean(per_pair) + sft_weight * jnp.mean(err_w)
    metrics = {
        "dpo_loss": jnp.mean(per_pair),
        "reward_accuracy": jnp.mean((margin > 0).astype(jnp.float32)),
        "margin": jnp.mean(margin),
        "err_w": jnp.mean(err_w), "err_l": jnp.mean(err_l),
        "ref_err_w": jnp.mean(ref_err_w), "ref_err_l": jnp.mean(ref_err_l),
    }
    return loss, metrics


def pair_inputs(x_w, x_l, noise, t):
    """Noisy inputs and velocity targets of a pair, batched [w; l] along axis 0.

    x_w, x_l, noise: (b, f, c, h, w); t: (b,) in [0, 1] -> x_t (2b, ...), v (2b, ...), t (2b,).
    """
    tt = t.astype(jnp.float32).reshape((-1,) + (1,) * (x_w.ndim - 1))
    x = jnp.concatenate([x_w, x_l], axis=0).astype(jnp.float32)
    n = jnp.concatenate([noise, noise], axis=0).astype(jnp.float32)
    t2 = jnp.concatenate([tt, tt], axis=0)
    return (1.0 - t2) * n + t2 * x, x - n, jnp.concatenate([t, t], axis=0)
