"""The Video-DPO train step: policy and frozen reference on a batch of preference pairs, one program.

Batch layout (a dict; arrays are the global batch of b pairs, leading axis b):
  `mean_w`, `logvar_w`  (b, f, c, h, w)  VAE posterior moments of the preferred video
  `mean_l`, `logvar_l`  (b, f, c, h, w)  the rejected video (same prompt, same latent shape)
  `y`, `y_mask`, `clip`  the prompt's conditioning, as in `train_step.py`
Every step draws fresh latents from both posteriors and ONE noise and ONE t per pair; the pair is
batched `[w; l]` (2b rows) through one policy forward (with gradients) and one reference forward
(without), and `dpo_loss.dpo_loss` compares their per-sample velocity errors.

The reference is a separate, never-donated argument: `frozen = {"reference": State, "base":
State | None}`. `reference` is a plain `StepVideoDiT` state (any dtype, bfloat16 by default in
`training/dpo.py`), run by `ref_graphdef` and sharded by the same rules as the policy. `base` holds the
frozen variables of an adapted policy (`models/lora.py`): the policy is
`merge(graphdef, state.params, base)`; None for full fine-tuning. With LoRA started from the
reference, `base` may be the very same arrays as `reference` (one copy in memory).

Step-Video-TI2V (a DiT with `cfg.ti2v`): each video of a pair is conditioned on its own first latent
frame, with the pair's motion score (`motion_score` (b,) in the batch, else `StepSettings.motion_score`),
as `train_step.image_inputs`.

Gradient accumulation scans `accum_steps` equal micro-batches of pairs; the loss is a mean over
pairs, so the averaged gradient and metrics equal the full batch's.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from stepvideo_jax.parallel.rules import LOGICAL_RULES, constrain_state
from stepvideo_jax.training import flow_loss
from stepvideo_jax.training.dpo_loss import BETA_SCHEDULES, dpo_loss, pair_inputs, velocity_error
from stepvideo_jax.training.train_state import TrainState
from stepvideo_jax.training.train_step import COND_KEYS, StepSettings, apply_gradients, image_inputs, remat_policy

PAIR_KEYS = ("mean_w", "logvar_w", "mean_l", "logvar_l") + COND_KEYS


@dataclasses.dataclass(frozen=True)
class DPOSettings:
    """The objective's constants (see `dpo_loss.py`). beta 500: the paper lowered Diffusion-DPO's
    5000 (and raised the learning rate); our velocity errors are per-element means, as theirs."""

    beta: float = 500.0
    beta_schedule: str = "constant"   # or "t_squared": beta * t^2
    sft_weight: float = 0.0           # flow-matching term on the preferred sample

    def __post_init__(self):
        if self.beta_schedule not in BETA_SCHEDULES:
            raise ValueError(f"unknown beta_schedule {self.beta_schedule!r}; choose one of {BETA_SCHEDULES}")
        if not self.beta > 0 or self.sft_weight < 0:
            raise ValueError(f"need beta > 0 and sft_weight >= 0, got {self.beta}, {self.sft_weight}")


def draw_pair_inputs(key: jax.Array, batch: dict, settings: StepSettings) -> dict:
    """Latent samples `x_w`, `x_l` (b f c h w), one `noise` and one `t` (b,) per pair, conditioning."""
    missing = [k for k in PAIR_KEYS if k not in batch]
    if missing:
        raise ValueError(f"a DPO batch needs {PAIR_KEYS}; missing {missing}")
    if batch["mean_w"].shape != batch["mean_l"].shape:
        raise ValueError(f"preferred {batch['mean_w'].shape} and rejected {batch['mean_l'].shape} latents differ")
    if settings.cond_dropout > 0:
        raise ValueError("DPO compares two videos of one prompt: set step.cond_dropout = 0")
    k_w, k_l, k_noise, k_t = jax.random.split(key, 4)
    x_w = flow_loss.sample_posterior(k_w, batch["mean_w"], batch["logvar_w"])
    x_l = flow_loss.sample_posterior(k_l, batch["mean_l"], batch["logvar_l"])
    t = flow_loss.sample_timesteps(k_t, x_w.shape[0], settings.timestep_distribution,
                                   logit_mean=settings.logit_mean, logit_std=settings.logit_std,
                                   shift=settings.timestep_shift)
    extra = {"motion_score": batch["motion_score"]} if "motion_score" in batch else {}
    return {"x_w": x_w, "x_l": x_l, "noise": jax.random.normal(k_noise, x_w.shape, jnp.float32), "t": t,
            **{k: batch[k] for k in COND_KEYS}, **extra}


def pair_errors(model: nnx.Module, inputs: dict, *, backend=None, remat=None,
                motion_score: Optional[float] = None) -> jax.Array:
    """Per-sample velocity errors (2b,) of `model` on the batched pair `[w; l]`, float32."""
    x_t, v, t2 = pair_inputs(inputs["x_w"], inputs["x_l"], inputs["noise"], inputs["t"])
    two = lambda a: jnp.concatenate([a, a], axis=0)
    rows = {"x": jnp.concatenate([inputs["x_w"], inputs["x_l"]])}
    if "motion_score" in inputs:
        rows["motion_score"] = two(jnp.asarray(inputs["motion_score"], jnp.float32))
    image = image_inputs(model, rows, motion_score)
    pred = model(x_t, t2, two(inputs["y"]), two(inputs["y_mask"]), two(inputs["clip"]), backend=backend,
                 remat_policy=remat, **image)
    return velocity_error(pred, v)


def _policy(graphdef, params, frozen):
    base = frozen.get("base")
    return nnx.merge(graphdef, params) if base is None else nnx.merge(graphdef, params, base)


def _micro(graphdef, ref_graphdef, params, frozen, inputs, settings: StepSettings, dpo: DPOSettings):
    """(loss, metrics), grads of one micro-batch of pairs."""
    b = inputs["t"].shape[0]
    ref_err = jax.lax.stop_gradient(pair_errors(nnx.merge(ref_graphdef, frozen["reference"]), inputs,
                                                backend=settings.attention_backend,
                                                motion_score=settings.motion_score))

    def loss_fn(p):
        err = pair_errors(_policy(graphdef, p, frozen), inputs, backend=settings.attention_backend,
                          remat=remat_policy(settings.remat), motion_score=settings.motion_score)
        return dpo_loss(err[:b], err[b:], ref_err[:b], ref_err[b:], inputs["t"], beta=dpo.beta,
                        beta_schedule=dpo.beta_schedule, sft_weight=dpo.sft_weight)

    return jax.value_and_grad(loss_fn, has_aux=True)(params)


def dpo_loss_and_grads(graphdef, ref_graphdef, params: nnx.State, frozen: dict, batch: dict, key: jax.Array,
                       settings: StepSettings, dpo: DPOSettings):
    """(loss, metrics, float32 grads) over the batch of pairs, accumulated over micro-batches."""
    n = settings.accum_steps
    b = batch["mean_w"].shape[0]
    if n < 1 or b % n:
        raise ValueError(f"accum_steps {n} must be >= 1 and divide the number of pairs {b}")
    inputs = draw_pair_inputs(key, batch, settings)
    run = lambda mb: _micro(graphdef, ref_graphdef, params, frozen, mb, settings, dpo)
    if n == 1:
        (loss, metrics), grads = run(inputs)
        return loss, metrics, grads
    micro = jax.tree.map(lambda a: a.reshape((n, b // n) + a.shape[1:]), inputs)

    def body(carry, mb):
        return jax.tree.map(jnp.add, carry, run(mb)), None

    shapes = jax.eval_shape(run, jax.tree.map(lambda a: a[0], micro))
    (total_loss, total_metrics), total_grads = jax.lax.scan(
        body, jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes), micro)[0]
    total = (total_loss, total_metrics, total_grads)
    return jax.tree.map(lambda a: a / n, total)


def make_dpo_step(graphdef, optimizer: optax.GradientTransformation, schedule: optax.Schedule,
                  settings: StepSettings, *, ref_graphdef, dpo: DPOSettings):
    """`dpo_step(state, batch, frozen) -> (state, metrics)`; pure: jit at the edge, donate `state`
    only. metrics: `loss`, `grad_norm`, `learning_rate`, `finite` and those of `dpo_loss`
    (`reward_accuracy`, `margin`, `err_w`, `err_l`, `ref_err_w`, `ref_err_l`, `dpo_loss`)."""

    def dpo_step(state: TrainState, batch: dict, frozen: dict):
        key = jax.random.fold_in(jax.random.wrap_key_data(state.key), state.step)
        compute = constrain_state(state.params, LOGICAL_RULES)   # gathered from the STATE_RULES layout
        loss, metrics, grads = dpo_loss_and_grads(graphdef, ref_graphdef, compute, frozen, batch, key,
                                                  settings, dpo)
        state, step_metrics = apply_gradients(state, loss, grads, optimizer, schedule, settings)
        return state, {**metrics, **step_metrics}

    return dpo_step


def pair_metrics(graphdef, ref_graphdef, params: nnx.State, frozen: dict, inputs: dict, dpo: DPOSettings, *,
                 backend: Optional[str] = None, motion_score: Optional[float] = None) -> dict:
    """DPO loss and metrics of fixed pair inputs (`draw_pair_inputs` output), no gradient; for
    evaluation on held-out pairs and the checks at initialisation."""
    b = inputs["t"].shape[0]
    err = pair_errors(_policy(graphdef, params, frozen), inputs, backend=backend, motion_score=motion_score)
    ref_err = pair_errors(nnx.merge(ref_graphdef, frozen["reference"]), inputs, backend=backend,
                          motion_score=motion_score)
    loss, metrics = dpo_loss(err[:b], err[b:], ref_err[:b], ref_err[b:], inputs["t"], beta=dpo.beta,
                             beta_schedule=dpo.beta_schedule, sft_weight=dpo.sft_weight)
    return {**metrics, "loss": loss}
