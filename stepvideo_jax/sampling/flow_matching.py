"""Flow-matching sampling of Step-Video-T2V: SD3-shifted schedule, Euler steps, CFG, the loop.

Convention of the official `FlowMatchDiscreteScheduler` (reverse=False): t = 0 is pure noise,
t = 1 is data, the model predicts the velocity (data - noise), and an Euler step moves the latents
from sigma_i to sigma_{i+1} with a positive dt. The schedule never calls the model at t = 1.

Latents are `b f c h w` float32 throughout; the model sees them (and t) cast to its own dtype, its
prediction is guided in that dtype, and every Euler step returns float32, as the official loop does.
"""
from __future__ import annotations

import dataclasses
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import tqdm

# velocity_fn(params, x_bfchw, t_b, cond) -> velocity bfchw. `t` in [0, 1) per row (the model
# scales it by 1000 itself); `cond` is a pytree whose leaves have the same leading batch as x.
VelocityFn = Callable[[Any, jax.Array, jax.Array, Any], jax.Array]

# Steps of one schedule at most: 20x the base preset's 50, hours of denoising at full size already;
# checked before the schedule's arrays are allocated (1e9 steps would ask for 8 GB of them).
MAX_STEPS = 1000


def torch_linspace_f32(start: float, end: float, num: int) -> np.ndarray:
    """`torch.linspace(start, end, num)` in float32, bit for bit (CPU kernel).

    torch computes `step = (end - start) / (num - 1)` in float32 and fills the first half as
    `start + step * i` (one rounding: the kernel is compiled with FMA contraction) and the second
    half from the other end as `end - step * (num - 1 - i)`. The products are exact in float64 for
    any `num < 2**29`, so float64 arithmetic followed by one cast to float32 rounds exactly once.
    """
    if num < 1:
        raise ValueError(f"linspace needs num >= 1, got {num}")
    start32, end32 = np.float32(start), np.float32(end)
    if num == 1:
        return np.array([start32], np.float32)
    step = np.float64(np.float32((end32 - start32) / np.float32(num - 1)))
    i = np.arange(num, dtype=np.float64)
    front = np.float64(start32) + step * i
    back = np.float64(end32) - np.float64(np.float32(step * (num - 1 - i)))
    return np.where(i < num // 2, front, back).astype(np.float32)


def sd3_time_shift(u: np.ndarray, shift: float) -> np.ndarray:
    """`shift * u / (1 + (shift - 1) * u)` in float32, operation by operation as the official code."""
    u = np.asarray(u, np.float32)
    s = np.float32(shift)
    return ((s * u) / (np.float32(1) + np.float32(shift - 1) * u)).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class Schedule:
    """`timesteps` (N,) are the model's t values; `sigmas` (N+1,) the Euler grid, ascending 0 -> 1."""

    timesteps: np.ndarray
    sigmas: np.ndarray

    @property
    def num_steps(self) -> int:
        return int(self.timesteps.shape[0])


def make_schedule(num_steps: int, shift: float) -> Schedule:
    """The official `set_timesteps(num_steps, time_shift=shift)` with reverse=False, in float32.

    u = linspace(1, 0, N + 1); sigmas = 1 - sd3_shift(u); timesteps = sigmas[:N]. Bitwise equal to
    the official float32 values (float64 evaluation differs by up to 9e-8).
    """
    if not isinstance(num_steps, (int, np.integer)) or isinstance(num_steps, bool) or num_steps < 1:
        raise ValueError(f"num_steps must be a positive integer, got {num_steps!r}")
    if num_steps > MAX_STEPS:
        raise ValueError(f"num_steps={num_steps} is above the limit {MAX_STEPS} (20x the base preset's 50; "
                         "the official presets use 50 and 15)")
    if not np.isfinite(shift) or shift <= 0:
        raise ValueError(f"time shift must be a positive finite number, got {shift!r} "
                         "(the official presets use 13.0 for the base model and 17.0 for Turbo)")
    u = torch_linspace_f32(1.0, 0.0, int(num_steps) + 1)
    sigmas = (np.float32(1) - sd3_time_shift(u, shift)).astype(np.float32)
    return Schedule(timesteps=sigmas[:-1].copy(), sigmas=sigmas)


def euler_step(sample: jax.Array, velocity: jax.Array, sigma, sigma_next) -> jax.Array:
    """`sample + velocity * (sigma_next - sigma)`, float32 whatever the input dtypes."""
    dt = jnp.asarray(sigma_next, jnp.float32) - jnp.asarray(sigma, jnp.float32)
    return sample.astype(jnp.float32) + velocity.astype(jnp.float32) * dt


def classifier_free_guidance(pred: jax.Array, scale) -> jax.Array:
    """`u + scale * (c - u)` for `pred` = concat([cond, uncond]) on the batch axis (cond first).

    Computed in pred's dtype with the product formed in float32 and rounded once, as torch does for
    a Python-float scale on a bfloat16 tensor; identical to the plain formula in float32.
    """
    if pred.shape[0] % 2:
        raise ValueError(f"CFG needs an even batch [cond rows, uncond rows], got {pred.shape[0]} rows")
    cond, uncond = jnp.split(pred, 2, axis=0)
    delta = (cond - uncond).astype(jnp.float32)
    return uncond + (jnp.asarray(scale, jnp.float32) * delta).astype(pred.dtype)


def uses_cfg(guidance_scale: float) -> bool:
    """CFG runs only for guidance > 1; at guidance <= 1 the uncond branch is skipped (pure cond)."""
    return guidance_scale > 1.0


# "constant": every step guided by `guidance_scale`. "decaying": the Turbo paper's schedule
# cfg_t = max(cfg_max - 9 t (cfg_max - 1), 1) in this module's t (t = 0 noise), cfg_max the
# `guidance_scale`: full guidance at pure noise, falling linearly to none at t = 1/9, so only the
# noisiest ninth of the trajectory pays for the unconditional branch.
CFG_SCHEDULES = ("constant", "decaying")


def guidance_schedule(timesteps: np.ndarray, guidance_scale: float, kind: str = "constant") -> np.ndarray:
    """(N,) float32 guidance scale of each step, evaluated at the step's model t (`timesteps`)."""
    t = np.asarray(timesteps, np.float32)
    g = np.float32(guidance_scale)
    if kind == "constant":
        return np.full(t.shape, g, np.float32)
    if kind == "decaying":
        return np.maximum(g - np.float32(9) * t * (g - np.float32(1)), np.float32(1)).astype(np.float32)
    raise ValueError(f"unknown cfg_schedule {kind!r}; choose one of {CFG_SCHEDULES}")


@dataclasses.dataclass(frozen=True)
class SamplerSettings:
    """Denoising settings: steps, CFG scale, SD3 time shift (base 50/9/13, Turbo 15/5/17), and how
    the CFG scale varies over the steps (`CFG_SCHEDULES`; with "decaying", `guidance_scale` is cfg_max)."""

    num_steps: int
    guidance_scale: float
    shift: float
    cfg_schedule: str = "constant"

    def __post_init__(self):
        make_schedule(self.num_steps, self.shift)
        if not np.isfinite(self.guidance_scale) or self.guidance_scale < 0:
            raise ValueError(f"guidance_scale must be a finite number >= 0, got {self.guidance_scale!r} "
                             "(values <= 1 disable classifier-free guidance)")
        if self.cfg_schedule not in CFG_SCHEDULES:
            raise ValueError(f"unknown cfg_schedule {self.cfg_schedule!r}; choose one of {CFG_SCHEDULES}")

    def guidance(self, timesteps: np.ndarray) -> np.ndarray:
        """(N,) guidance scale per step of a schedule with these model t values."""
        return guidance_schedule(timesteps, self.guidance_scale, self.cfg_schedule)

    @property
    def cfg(self) -> bool:
        return uses_cfg(self.guidance_scale)


def check_cond_rows(cond, latent_rows: int, *, cfg: bool) -> None:
    """Every cond leaf must have 2b rows [b cond, b uncond] with CFG, else b; checked on shapes (at
    trace time) so that a wrong batch is named here, not as a reshape error deep in the model."""
    want = 2 * latent_rows if cfg else latent_rows
    wrong = [f"{jax.tree_util.keystr(path, simple=True, separator='/')} {tuple(np.shape(leaf))}"
             for path, leaf in jax.tree_util.tree_leaves_with_path(cond)
             if np.ndim(leaf) < 1 or np.shape(leaf)[0] != want]
    if wrong:
        expected = (f"{want} rows: {latent_rows} cond + {latent_rows} uncond (classifier-free guidance "
                    "is on: guidance_scale > 1)" if cfg else f"{want} rows, one per latent (no CFG)")
        raise ValueError(f"conditioning leaves {', '.join(wrong)} do not fit {latent_rows} latent row(s): "
                         f"expected {expected}")


def denoise_step(velocity_fn: VelocityFn, params, latents, cond, t, sigma, sigma_next, guidance,
                 *, cfg: bool, model_dtype, cfg_sequential: bool = False) -> jax.Array:
    """One sampler step: velocity at t (CFG batch [cond, uncond] when `cfg`), guidance, Euler.

    latents (b, f, c, h, w) float32; cond leaves have 2b rows with `cfg`, else b (ValueError
    otherwise); t, sigma, sigma_next, guidance are scalars. Returns float32 latents.

    `cfg_sequential` (with `cfg`): the cond rows, then the uncond rows, each a batch of b through
    the model, as the two iterations of one `lax.map` (one compiled model, run twice), instead of
    one batch of 2b: the activation temporaries are those of b rows, half the batched step's, for
    two passes over the weights. The same arithmetic on fewer rows: equal to float32 rounding, not
    bitwise (XLA's CPU matmuls round 1 row and 2 rows differently; `tests/test_offload.py`).
    """
    check_cond_rows(cond, latents.shape[0], cfg=cfg)
    x = latents.astype(model_dtype)
    if cfg and cfg_sequential:
        t_b = jnp.full((x.shape[0],), t, jnp.float32).astype(model_dtype)
        halves = jax.tree.map(lambda a: a.reshape(2, a.shape[0] // 2, *a.shape[1:]), cond)
        pred = jax.lax.map(lambda c: velocity_fn(params, x, t_b, c), halves)
        pred = pred.reshape(2 * pred.shape[1], *pred.shape[2:])
    else:
        if cfg:
            x = jnp.concatenate([x, x], axis=0)
        t_b = jnp.full((x.shape[0],), t, jnp.float32).astype(model_dtype)
        pred = velocity_fn(params, x, t_b, cond)
    if cfg:
        pred = classifier_free_guidance(pred, guidance)
    return euler_step(latents, pred, sigma, sigma_next)


class FlowMatchSampler:
    """A host loop over ONE jitted step (latents donated), so a progress bar can run per step.

    The step is traced once per (latent shape, cond shapes, cfg on/off, dtype); t, sigmas and the
    guidance scale are runtime values, so new prompts, seeds, step counts, shifts or scales of the
    same shape never recompile. Build one sampler per pipeline and reuse it. `cfg_sequential`: see
    `denoise_step`.
    """

    def __init__(self, velocity_fn: VelocityFn, *, model_dtype=jnp.float32, cfg_sequential: bool = False):
        self.velocity_fn = velocity_fn
        self.model_dtype = jnp.dtype(model_dtype)
        self.cfg_sequential = bool(cfg_sequential)
        self._step = jax.jit(self._step_impl, static_argnames=("cfg",), donate_argnums=(1,))

    def _step_impl(self, params, latents, cond, t, sigma, sigma_next, guidance, *, cfg):
        return denoise_step(self.velocity_fn, params, latents, cond, t, sigma, sigma_next, guidance,
                            cfg=cfg, model_dtype=self.model_dtype, cfg_sequential=self.cfg_sequential)

    def sample(self, params, noise: jax.Array, cond, settings: SamplerSettings, *,
               progress: bool = False,
               on_step: Callable[[int, jax.Array], None] | None = None) -> jax.Array:
        """Denoise `noise` (b, f, c, h, w) -> final float32 latents.

        `cond`: pytree of conditioning with 2b rows [cond, uncond] if `settings.cfg`, else b rows.
        `progress`: a stderr bar with the time of the last step and the ETA (each step is then
        waited for, so the times are real); redrawn live on a terminal, else (a log file) written
        at the start and the end only. `on_step(i, latents)` sees the latents after step i; it
        must copy what it keeps, since that buffer is donated to the next step.
        """
        sched = make_schedule(settings.num_steps, settings.shift)
        latents = jnp.array(noise, jnp.float32, copy=True)
        guidance = settings.guidance(sched.timesteps)
        # steps whose scale is <= 1 (a decaying schedule's later steps) run the cond rows alone
        cond_only = jax.tree.map(lambda a: a[: a.shape[0] // 2], cond) if settings.cfg else cond
        bar = tqdm.tqdm(total=sched.num_steps, desc="denoise", unit="step", file=sys.stderr,
                        disable=not progress, mininterval=0.1 if sys.stderr.isatty() else float("inf"))
        with bar:
            for i in range(sched.num_steps):
                start = time.perf_counter()
                guided = settings.cfg and uses_cfg(float(guidance[i]))
                latents = self._step(params, latents, cond if guided else cond_only, sched.timesteps[i],
                                     sched.sigmas[i], sched.sigmas[i + 1], guidance[i], cfg=guided)
                if on_step is not None:
                    on_step(i, latents)
                if progress:
                    latents.block_until_ready()
                    bar.set_postfix_str(f"last step {time.perf_counter() - start:.2f} s", refresh=False)
                    bar.update()
        return latents
