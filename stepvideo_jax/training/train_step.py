"""The pure flow-matching train step and the held-out evaluation, functions of (state, batch).

Batch layout (a dict; arrays are the global batch, leading axis b):
  `mean`, `logvar`   (b, f, c, h, w)  VAE posterior moments; a fresh latent is drawn every step
  `y`                (b, l_text, caption_channels[0])  Step-LLM states
  `y_mask`           (b, l_clip + l_text)  1 = valid, CLIP positions first
  `clip`             (b, l_clip, caption_channels[1])  CLIP states
`negative` holds `y`, `y_mask`, `clip` of the encoded negative/empty prompt with batch 1; with
probability `cond_dropout` a row's conditioning is replaced by it (classifier-free guidance).

Step-Video-TI2V (a DiT with `cfg.ti2v`): the image condition is the sample's own first latent frame
(frame 0 of this step's latent draw, from the moments data/precompute encoded once), zeros on the
other frames, rounded to bfloat16 as at inference (`image_condition.condition_frames`); the motion
score is the batch's `motion_score` (b,) when it has one, else `StepSettings.motion_score`. Text
dropout is unchanged: the image condition is never dropped (both CFG rows share it at inference).

Gradient accumulation splits the batch into `accum_steps` micro-batches, scanned in order, and
averages their gradients (equal to the full-batch gradient of the mean loss).
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from stepvideo_jax.parallel.rules import LOGICAL_RULES, STATE_RULES, constrain_state
from stepvideo_jax.sampling.image_condition import condition_frames
from stepvideo_jax.training import flow_loss
from stepvideo_jax.training.train_state import TrainState, ema_update

COND_KEYS = ("y", "y_mask", "clip")

# Named rematerialisation policies for one DiT block ("none" = no remat, keep every activation).
REMAT_POLICIES: dict[str, Optional[Callable]] = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_saveable,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def remat_policy(name: str):
    if name not in REMAT_POLICIES:
        raise ValueError(f"unknown remat policy {name!r}; choose one of {sorted(REMAT_POLICIES)}")
    return REMAT_POLICIES[name]


@dataclasses.dataclass(frozen=True)
class StepSettings:
    """Static settings of the step (hashable; part of the compiled function)."""

    timestep_distribution: str = "uniform"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    timestep_shift: float = 1.0
    u_shape_a: float = 5.0          # the "u_shaped" distribution's a
    cond_dropout: float = 0.0
    accum_steps: int = 1
    ema_decay: float = 0.0          # used when the state holds an EMA
    remat: str = "none"
    attention_backend: Optional[str] = None
    motion_score: Optional[float] = None  # TI2V: for batches without a per-sample `motion_score`

    def __post_init__(self):
        """Names a bad remat policy, timestep distribution or accumulation count when the settings are
        made, not when the step is first traced."""
        remat_policy(self.remat)
        flow_loss.check_timesteps(self.timestep_distribution, shift=self.timestep_shift, u_shape_a=self.u_shape_a)
        if self.accum_steps < 1:
            raise ValueError(f"accum_steps {self.accum_steps} must be >= 1")


def draw_timesteps_and_conditioning(k_t: jax.Array, k_drop: jax.Array, batch: dict, settings: StepSettings,
                                     negative: Optional[dict] = None) -> tuple[jax.Array, dict]:
    """`t` (b,) from `settings.timestep_distribution` and the batch's conditioning after CFG dropout:
    the draws every objective on latents shares (flow matching, reflow)."""
    t = flow_loss.sample_timesteps(k_t, batch["y"].shape[0], settings.timestep_distribution,
                                   logit_mean=settings.logit_mean, logit_std=settings.logit_std,
                                   shift=settings.timestep_shift, u_shape_a=settings.u_shape_a)
    cond = {k: batch[k] for k in COND_KEYS}
    if settings.cond_dropout > 0:
        if negative is None:
            raise ValueError("cond_dropout > 0 needs the negative prompt's conditioning")
        cond = flow_loss.drop_conditioning(k_drop, cond, negative, settings.cond_dropout)
    return t, cond


def draw_inputs(key: jax.Array, batch: dict, settings: StepSettings, negative: Optional[dict] = None) -> dict:
    """The step's random draws for the whole batch: latent sample `x`, `noise`, `t`, and the
    conditioning after dropout. Drawn before any micro-batching, so accumulation does not change them."""
    k_latent, k_noise, k_t, k_drop = jax.random.split(key, 4)
    x = flow_loss.sample_posterior(k_latent, batch["mean"], batch["logvar"])
    t, cond = draw_timesteps_and_conditioning(k_t, k_drop, batch, settings, negative)
    extra = {"motion_score": batch["motion_score"]} if "motion_score" in batch else {}
    return {"x": x, "noise": jax.random.normal(k_noise, x.shape, jnp.float32), "t": t, **cond, **extra}


def image_inputs(model: nnx.Module, inputs: dict, motion_score: Optional[float]) -> dict:
    """TI2V DiT: {"condition", "motion_score"} from the rows' own latents `inputs["x"]` (see the module
    docstring); {} for a T2V DiT."""
    if not model.cfg.ti2v:
        return {}
    x = inputs["x"]
    ms = inputs.get("motion_score")
    if ms is None:
        if motion_score is None:
            raise ValueError("a TI2V DiT trains with a motion score: set step.motion_score (e.g. 5) or give the "
                             "batch a per-sample motion_score")
        ms = jnp.full((x.shape[0],), motion_score, jnp.float32)
    return {"condition": condition_frames(x[:, :1], x.shape[1]), "motion_score": jnp.asarray(ms, jnp.float32)}


def _loss(graphdef, params, inputs: dict, settings: StepSettings):
    model = nnx.merge(graphdef, params)
    policy = remat_policy(settings.remat)
    image = image_inputs(model, inputs, settings.motion_score)

    def velocity(xt, t):
        return model(xt, t, inputs["y"], inputs["y_mask"], inputs["clip"], backend=settings.attention_backend,
                     remat_policy=policy, **image)

    return flow_loss.flow_matching_loss(velocity, inputs["x"], inputs["noise"], inputs["t"])


def loss_and_grads(graphdef, params: nnx.State, batch: dict, key: jax.Array, settings: StepSettings,
                   negative: Optional[dict] = None, *, draw: Callable = draw_inputs) -> tuple[jax.Array, nnx.State]:
    """Mean loss and float32 gradients over the batch (accumulated over micro-batches).

    `draw(key, batch, settings, negative)` -> the loss inputs (`x`, `noise`, `t`, conditioning):
    `draw_inputs` for flow matching, `training.reflow.draw_reflow_inputs` for reflow pairs."""
    n = settings.accum_steps
    inputs = draw(key, batch, settings, negative)
    b = inputs["x"].shape[0]
    if n < 1 or b % n:
        raise ValueError(f"accum_steps {n} must be >= 1 and divide the batch size {b}")
    grad_fn = jax.value_and_grad(lambda p, mb: _loss(graphdef, p, mb, settings))
    if n == 1:
        return grad_fn(params, inputs)
    micro = jax.tree.map(lambda a: a.reshape((n, b // n) + a.shape[1:]), inputs)

    def body(carry, mb):
        loss_sum, grad_sum = carry
        loss, grads = grad_fn(params, mb)
        return (loss_sum + loss, jax.tree.map(jnp.add, grad_sum, grads)), None

    zeros = jax.tree.map(jnp.zeros_like, params)
    (loss_sum, grad_sum), _ = jax.lax.scan(body, (jnp.zeros((), jnp.float32), zeros), micro)
    return loss_sum / n, jax.tree.map(lambda g: g / n, grad_sum)


def apply_gradients(state: TrainState, loss: jax.Array, grads: nnx.State, optimizer: optax.GradientTransformation,
                    schedule: optax.Schedule, settings: StepSettings) -> tuple[TrainState, dict]:
    """The update every objective shares: the gradients back in the state's layout, one optimiser
    step, the EMA. Returns (next state, {`loss`, `grad_norm` (before clipping), `learning_rate` (of
    this update), `finite`})."""
    grads = constrain_state(grads, STATE_RULES)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema = None if state.ema is None else ema_update(state.ema, params, settings.ema_decay)
    metrics = {"loss": loss, "grad_norm": optax.global_norm(grads),
               "learning_rate": jnp.asarray(schedule(state.step), jnp.float32), "finite": jnp.isfinite(loss)}
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state, ema=ema), metrics


def make_train_step(graphdef, optimizer: optax.GradientTransformation, schedule: optax.Schedule,
                    settings: StepSettings, *, draw: Callable = draw_inputs):
    """`train_step(state, batch, negative) -> (state, metrics)`; pure, jit and donate at the edge.
    `draw`: how a batch becomes the loss inputs (see `loss_and_grads`).

    The state may be laid out by `parallel.rules.STATE_RULES` (the loop's choice: over fsdp x
    sequence); the forward and backward run on the LOGICAL_RULES layout, gathered once per step.

    metrics: `loss`, `grad_norm` (before clipping), `learning_rate` (of this update), `finite`.
    """

    def train_step(state: TrainState, batch: dict, negative: Optional[dict] = None):
        key = jax.random.fold_in(jax.random.wrap_key_data(state.key), state.step)
        compute = constrain_state(state.params, LOGICAL_RULES)   # gathered from the STATE_RULES layout
        loss, grads = loss_and_grads(graphdef, compute, batch, key, settings, negative, draw=draw)
        return apply_gradients(state, loss, grads, optimizer, schedule, settings)

    return train_step


def heldout_loss(graphdef, params: nnx.State, heldout: dict, *, backend: Optional[str] = None,
                 motion_score: Optional[float] = None) -> jax.Array:
    """Deterministic loss on a fixed set: `heldout` holds `x` (b f c h w), `noise`, `t` (b,) and the
    conditioning (`y`, `y_mask`, `clip`); TI2V: the image condition as in training."""
    model = nnx.merge(graphdef, params)
    image = image_inputs(model, heldout, motion_score)

    def velocity(xt, t):
        return model(xt, t, heldout["y"], heldout["y_mask"], heldout["clip"], backend=backend, **image)

    return flow_loss.flow_matching_loss(velocity, heldout["x"], heldout["noise"], heldout["t"])

