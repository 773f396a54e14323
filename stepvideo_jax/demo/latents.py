"""The DiT's training set for the demo: VAE posterior moments of synthetic renders with both of
their captions encoded by the frozen text encoders, written in the `stepvideo-latents-v1` format.

Every training scene is rendered `renders_per_scene` times (start position and size from a seed
derived from (seed, scene, render)); each render is stored twice, with its English and its Chinese
caption, so the DiT learns both languages for the same videos. The negative conditioning (CFG
dropout) is the empty prompt, which is also what the demo samples with for the unconditional rows.
"""
from __future__ import annotations

import pathlib
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from stepvideo_jax.data import format as data_format
from stepvideo_jax.data import synthetic_motion as sm

LANGUAGES = ("en", "zh")
TRAINING_SCENES = sm.TRAIN_SCENES   # every component of the demo trains on these only
NEGATIVE_PROMPT = ""


def render_seed(seed: int, scene_index: int, render: int) -> int:
    return int(np.random.default_rng([seed, scene_index, render]).integers(2**31))


def moments_fn(vae: nnx.Module):
    """Jitted video (b f c h w) -> (mean, logvar), both (b f' z h' w'), logvar clamped."""
    graphdef, state = nnx.split(vae)

    @jax.jit
    def run(state, video):
        model = nnx.merge(graphdef, state)
        post = model.posterior(model.encode_moments(video, stream_frames=32))
        return post.mean, post.logvar

    return lambda video: run(state, video)


def write_latents(root, *, vae: nnx.Module, text, scenes: Sequence[sm.Scene], renders_per_scene: int,
                  frames: int, height: int, width: int, seed: int, batch: int = 8) -> data_format.Dataset:
    """Write the dataset to `root` (which must not hold one yet) and open it."""
    root = pathlib.Path(root)
    captions = [s.caption(lang) for s in scenes for lang in LANGUAGES]
    cond = {k: np.asarray(v, np.float32) for k, v in text(captions).items()}
    by_caption = {c: {k: v[i] for k, v in cond.items()} for i, c in enumerate(captions)}
    negative = {k: np.asarray(v, np.float32)[0] for k, v in text([NEGATIVE_PROMPT]).items()}
    writer = data_format.Writer(root, latent_channels=vae.cfg.z_channels,
                                caption_channels=(cond["y"].shape[-1], cond["clip"].shape[-1]),
                                text_length=cond["y"].shape[1], clip_length=cond["clip"].shape[1])
    encode = moments_fn(vae)
    jobs = [(i, s, r) for i, s in enumerate(scenes) for r in range(renders_per_scene)]
    for start in range(0, len(jobs), batch):
        part = jobs[start:start + batch]
        videos = np.stack([sm.to_model_range(sm.render(s, frames=frames, height=height, width=width,
                                                       seed=render_seed(seed, i, r))) for i, s, r in part])
        if len(part) < batch:   # one compiled shape
            videos = np.concatenate([videos, np.repeat(videos[-1:], batch - len(part), axis=0)])
        mean, logvar = (np.asarray(a, np.float32) for a in encode(jnp.asarray(videos)))
        for j, (_, scene, _) in enumerate(part):
            for lang in LANGUAGES:
                caption = scene.caption(lang)
                writer.add({"mean": mean[j], "logvar": logvar[j], **by_caption[caption]}, caption)
    writer.set_negative(negative)
    writer.close()
    return data_format.Dataset(root)
