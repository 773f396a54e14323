"""Sample videos during a training run (`config.samples`): latents of the first held-out prompts,
and mp4s with a release VAE, every `samples.every` steps (`TrainingSampler`)."""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from stepvideo_jax import checkpoints, paths
from stepvideo_jax.sampling.components import vae_decoder
from stepvideo_jax.sampling.flow_matching import FlowMatchSampler, SamplerSettings
from stepvideo_jax.sampling.image_condition import condition_frames
from stepvideo_jax.sampling.pipeline import dit_velocity_fn, postprocess
from stepvideo_jax.sampling.video_io import write_mp4
from stepvideo_jax.training import settings


class TrainingSampler:
    """Sample videos during training (`config.samples`): the first `count` held-out prompts from
    fixed noise with the official schedule (CFG against the negative prompt), saved as latents
    `samples/step_<n>.npy` (b f c h w) and, with `vae` (a release `vae/` directory), as mp4s
    `samples/step_<n>_<i>.mp4`. The sampler step and the VAE decoder are built once, so they
    compile once per run, not at every sampled step."""

    def __init__(self, graphdef, sample_cfg: settings.Samples, *, backend, dtype, in_channels: int,
                 motion_score: Optional[float] = None):
        self.cfg, self.motion_score = sample_cfg, motion_score
        self.settings = SamplerSettings(num_steps=sample_cfg.num_steps, guidance_scale=sample_cfg.guidance,
                                        shift=sample_cfg.shift)
        self.sampler = FlowMatchSampler(dit_velocity_fn(graphdef, backend=backend), model_dtype=dtype)
        self.decode = None
        if sample_cfg.vae:
            vae = checkpoints.load_vae(sample_cfg.vae)
            if vae.cfg.z_channels != in_channels:
                raise ValueError(f"samples.vae {sample_cfg.vae}: its z_channels ({vae.cfg.z_channels}) must be "
                                 f"the DiT's in_channels ({in_channels})")
            self.decode = vae_decoder(vae)

    def __call__(self, workdir, step: int, params, heldout: dict, negative: dict) -> epath.Path:
        """Sample with `params` (the EMA or raw weights) and write the files of `step` (process 0;
        every process samples)."""
        n = min(self.cfg.count, heldout["x"].shape[0])
        cond = {k: heldout[k][:n] for k in ("y", "y_mask", "clip")}
        if self.settings.cfg:
            cond = {k: jnp.concatenate([v, jnp.broadcast_to(negative[k].astype(v.dtype), v.shape)])
                    for k, v in cond.items()}
        if self.motion_score is not None:  # TI2V: the held-out videos' first latent frames, both CFG rows
            x = heldout["x"][:n]
            condition = condition_frames(x[:, :1], x.shape[1])
            rows = 2 if self.settings.cfg else 1
            cond["condition"] = jnp.concatenate([condition] * rows)
            cond["motion_score"] = jnp.full((rows * n,), self.motion_score, jnp.float32)
        noise = jax.random.normal(jax.random.key(self.cfg.seed), heldout["x"][:n].shape, jnp.float32)
        latents = self.sampler.sample(params, noise, cond, self.settings)
        out = paths.as_path(workdir) / "samples"
        path = out / f"step_{step:08d}.npy"
        video = np.asarray(self.decode(latents)) if self.decode is not None else None
        if not paths.writes_shared_files():
            return path
        out.mkdir(parents=True, exist_ok=True)
        with paths.local_then_move(path, ".npy") as tmp:
            np.save(tmp, np.asarray(latents))
        if video is not None:
            for i in range(n):
                write_mp4(out / f"step_{step:08d}_{i}.mp4", postprocess(video[i:i + 1]))
        return path
