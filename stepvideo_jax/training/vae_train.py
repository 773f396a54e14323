"""Training the Video-VAE: reconstruction (MSE) + KL to N(0, 1), a pure step jitted at the edge.

Videos are `b f c h w` in [-1, 1] (f a multiple of the VAE's `frame_len` or a valid remainder).
Per step: moments = encode(video), z = mean + std * eps (reparameterised, `eps` from the step key),
recon = decode(z);
    loss = mean(w * (recon - video)^2) + kl_weight * mean(KL(q(z | video) || N(0, 1)))
both means over elements, so `kl_weight` is per latent element relative to per pixel. The pixel
weight w is 1, plus `foreground_weight` where the target differs from its frame's median colour by
more than `foreground_threshold` in some channel: on flat-background videos (the synthetic renders) a
small object is a few percent of the pixels, so a plain MSE lets the VAE blur its colour and outline
at almost no cost. A small KL
keeps the latents near unit scale, the scale of the noise the DiT's flow starts from (the pipeline
decodes latents as they are, with no scaling factor).
"""
from __future__ import annotations

import dataclasses
from typing import Iterator

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from stepvideo_jax.training.train_state import TrainState

# Slab sizes for training: whole chunks at once (the streaming exists for full-resolution inference).
ENCODE_STREAM_FRAMES = 32
DECODE_STREAM_FRAMES = 32


@dataclasses.dataclass(frozen=True)
class VAELossSettings:
    kl_weight: float = 1e-4
    foreground_weight: float = 0.0
    foreground_threshold: float = 0.1


def pixel_weights(video: jax.Array, settings: VAELossSettings) -> jax.Array:
    """(b f c h w) -> (b f 1 h w) float32: 1, plus `foreground_weight` on the pixels of each frame that
    differ from the frame's per-channel median (its background, where that is flat)."""
    v = video.astype(jnp.float32)
    background = jnp.median(v, axis=(-2, -1), keepdims=True)
    foreground = jnp.max(jnp.abs(v - background), axis=-3, keepdims=True) > settings.foreground_threshold
    return 1.0 + settings.foreground_weight * foreground.astype(jnp.float32)


def kl_to_standard_normal(mean: jax.Array, logvar: jax.Array) -> jax.Array:
    """Elementwise KL(N(mean, exp(logvar)) || N(0, 1)), float32."""
    mean, logvar = mean.astype(jnp.float32), logvar.astype(jnp.float32)
    return 0.5 * (jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar)


def vae_loss(model: nnx.Module, video: jax.Array, key: jax.Array, settings: VAELossSettings):
    """(loss, metrics) of one batch; metrics: `recon_mse`, `kl`, `latent_std` (of the posterior mean)."""
    post = model.posterior(model.encode_moments(video, stream_frames=ENCODE_STREAM_FRAMES))
    recon = model.decode(post.sample(key), stream_frames=DECODE_STREAM_FRAMES).astype(jnp.float32)
    sq = jnp.square(recon - video.astype(jnp.float32))
    mse = jnp.mean(sq)
    weighted = jnp.mean(sq * pixel_weights(video, settings)) if settings.foreground_weight else mse
    kl = jnp.mean(kl_to_standard_normal(post.mean, post.logvar))
    loss = weighted + settings.kl_weight * kl
    return loss, {"recon_mse": mse, "kl": kl, "latent_std": jnp.std(post.mean.astype(jnp.float32))}


def make_vae_train_step(graphdef: nnx.GraphDef, optimizer: optax.GradientTransformation,
                        schedule: optax.Schedule, settings: VAELossSettings):
    """`step(state, video) -> (state, metrics)`; `state` is a `TrainState` of the VAE's params
    (no EMA). Step n draws its posterior noise from `fold_in(state.key, n)`."""

    def loss_fn(params, video, key):
        return vae_loss(nnx.merge(graphdef, params), video, key, settings)

    def step(state: TrainState, video: jax.Array):
        key = jax.random.fold_in(jax.random.wrap_key_data(state.key), state.step)
        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, video, key)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        metrics = dict(metrics, loss=loss, grad_norm=optax.global_norm(grads),
                       learning_rate=jnp.asarray(schedule(state.step), jnp.float32))
        return state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                             opt_state=opt_state), metrics

    return step


def fit(state: TrainState, step_fn, batches: Iterator[jax.Array], num_steps: int, *,
        log_every: int = 0, printer=print) -> tuple[TrainState, list[dict]]:
    """Run `num_steps` of a jitted `step_fn`; returns the state and the per-step metrics (floats).
    Stops with a RuntimeError naming the step if the loss is not finite."""
    history = []
    for _ in range(num_steps):
        state, metrics = step_fn(state, next(batches))
        m = {k: float(v) for k, v in jax.device_get(metrics).items()}
        step = int(state.step)
        if not jnp.isfinite(m["loss"]):
            raise RuntimeError(f"VAE loss is {m['loss']} at step {step}: stopping")
        history.append({"step": step, **m})
        if printer and log_every and step % log_every == 0:
            printer("vae step {step}: ".format(step=step)
                    + " ".join(f"{k}={v:.4g}" for k, v in m.items() if k != "step"))
    return state, history
