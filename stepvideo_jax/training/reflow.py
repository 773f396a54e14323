"""The reflow objective: step distillation of a flow-matching teacher into a straighter student.

    python -m stepvideo_jax.train --config configs/distill/demo.py --config.data.path=/data/reflow

(`config.objective = "reflow"`; the pairs come from `python -m stepvideo_jax.data.reflow_job`.)
The student (initialised from the teacher, `model.init_from`) is trained with the flow-matching loss
on the straight path between each reflow pair (`data/reflow.py`): z0 the teacher's initial noise
(regenerated from its seed on the devices), z1 the teacher's latent, in the project's t (t = 0 noise):

    x_t = (1 - t) z0 + t z1,   target z1 - z0,   loss = mean (v(x_t, t) - (z1 - z0))^2

with t from the U-shaped density ∝ exp(a t) + exp(a (1 - t)), a = 5 (`flow_loss.sample_u_shaped`;
`config.step.timestep_distribution = "u_shaped"`), and the same conditioning dropout as flow matching
(to the teacher's negative prompt). Everything else is the flow-matching loop (`training/loop.py`):
sharding, accumulation, remat, EMA, exact resume, metrics, held-out loss (fixed pairs, fixed
t ~ U(0, 1)), samples during training. Trained on its own pairs, the teacher's curved many-step
trajectories become straight lines that a few Euler steps follow (Liu et al. 2022, "2-rectified
flow"; the Step-Video-T2V-Turbo recipe).

Batch layout (host-local rows of `data.reflow.ReflowDataset`):
  `z1` (b, f, c, h, w) float32 teacher latents; `seed` (b,) int32 seeds of the initial noises;
  `y`, `y_mask`, `clip` the captions' conditioning (as `train_step`).
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from stepvideo_jax.data import reflow as reflow_data
from stepvideo_jax.training.train_step import COND_KEYS, StepSettings, draw_timesteps_and_conditioning, make_train_step

def draw_reflow_inputs(key: jax.Array, batch: dict, settings: StepSettings, negative: Optional[dict] = None) -> dict:
    """The loss inputs of a reflow batch: `x` = z1, `noise` = z0 (regenerated from `seed`), `t` from
    `settings.timestep_distribution`, conditioning after dropout. Drawn for the whole batch before
    any micro-batching, as `train_step.draw_inputs`."""
    k_t, k_drop = jax.random.split(key)
    z1 = batch["z1"].astype(jnp.float32)
    z0 = reflow_data.regenerate_noise(batch["seed"].astype(jnp.int32), z1.shape[1:])
    t, cond = draw_timesteps_and_conditioning(k_t, k_drop, batch, settings, negative)
    return {"x": z1, "noise": z0, "t": t, **cond}


def make_reflow_step(graphdef, optimizer, schedule, settings: StepSettings):
    """`step(state, batch, negative) -> (state, metrics)` on reflow batches (`make_train_step`)."""
    return make_train_step(graphdef, optimizer, schedule, settings, draw=draw_reflow_inputs)


def make_reflow_heldout(dataset: reflow_data.ReflowDataset, size: int, seed: int) -> dict:
    """A fixed evaluation set for `train_step.heldout_loss`: the first `size` pairs of the largest
    bucket, `x` = z1, `noise` = z0 of their seeds, t ~ U(0, 1) from `seed` (the reflow loss over
    uniform t, comparable before and after distillation)."""
    by_bucket: dict = {}
    for i in range(len(dataset)):
        by_bucket.setdefault(dataset.bucket(i), []).append(i)
    idx = max(by_bucket.values(), key=len)[:size]
    pairs = [dataset.load(i) for i in idx]
    out = {k: jnp.asarray(np.stack([p[k] for p in pairs])) for k in COND_KEYS}
    out["x"] = jnp.asarray(np.stack([p["z1"] for p in pairs]), jnp.float32)
    out["noise"] = reflow_data.regenerate_noise(np.array([p["seed"] for p in pairs], np.int32), out["x"].shape[1:])
    out["t"] = jax.random.uniform(jax.random.key(seed), (len(idx),), jnp.float32)
    return out


PAIRS = f"a {reflow_data.FORMAT} directory, written by python -m stepvideo_jax.data.reflow_job"


def open_pairs(data, workdir) -> reflow_data.ReflowDataset:
    """The reflow pairs of `data.path` (`settings.Data`); there is no synthetic set."""
    del workdir
    return reflow_data.ReflowDataset(data.path)

