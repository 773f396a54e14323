"""The first-frame image condition of Step-Video-TI2V: image file -> condition latents of the DiT.

As the official `StepVideoPipeline.prepare_condition_hidden_states`:

1. `load_image`: PIL `convert('RGB')` (alpha dropped, not composited; grayscale replicated; no EXIF
   rotation), uint8 (H0, W0, 3). Any mode other than RGB is reported in one log line.
2. `to_unit_range`: (3, H0, W0) float32 `x / 255 * 2 - 1`.
3. `cover_crop`: scale to COVER the target (h, w) and centre-crop. `fact = W0/H0 < w/h`: fit the
   width (`scale = w / W0`), else fit the height; resize to `(round(H0 s), round(W0 s))` with Python's
   half-to-even `round`; crop top/left = half the excess, floored. Never letterboxed; smaller images
   are upscaled.
4. `resize_antialiased`: torchvision's `Resize` on a float tensor, i.e. bilinear with antialias (PIL's
   triangle filter: support max(in/out, 1), weights from float32 positions, renormalised per output
   pixel), separable, width first.
5. `encode_condition`: VAE encode of that one frame (1, 1, 3, h, w) -> the posterior SAMPLE
   `mean + std * noise` (the official server's `vae.encode`; its noise is the caller's, seeded
   separately from the initial noise) -> (1, 1, z, h/s, w/s).
6. `condition_frames`: latent frame 0 = that sample, frames 1.. = zeros, rounded to bfloat16 values
   whatever the DiT dtype (the official code hard-codes bf16), (1, F, z, h/s, w/s) float32.
   Both CFG rows get the same condition (and the same motion score): only the text differs.
"""
from __future__ import annotations

import logging
import math
import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image, UnidentifiedImageError

log = logging.getLogger(__name__)

# The crop may keep at most this share of the resized image's long side; beyond it the aspect ratio
# is so unlike the target's that the crop is a sliver (and the resize would be huge).
MAX_COVER_FACTOR = 8


def load_image(path: str | os.PathLike) -> np.ndarray:
    """The image file as uint8 (H0, W0, 3), converted as the official `Image.open(p).convert('RGB')`;
    ValueError naming the file if it is missing or not an image Pillow can read."""

    path = pathlib.Path(path)
    if not path.is_file():
        raise ValueError(f"image {str(path)!r} not found (the first frame to animate: a PNG, JPEG, ... file)")
    try:
        with Image.open(path) as img:
            img.load()
            mode = img.mode
            rgb = img.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise ValueError(f"image {str(path)!r} cannot be read as an image ({e})") from None
    if mode != "RGB":
        log.warning("image %s has mode %s: converted to RGB as the official pipeline does (%s)", path, mode,
                    "alpha dropped, not composited" if "A" in mode or "transparency" in rgb.info
                    else "channels replicated/mapped by PIL")
    arr = np.asarray(rgb, np.uint8)
    if arr.ndim != 3 or min(arr.shape[:2]) < 1:
        raise ValueError(f"image {str(path)!r} is empty ({arr.shape})")
    return arr


def to_unit_range(image: np.ndarray) -> np.ndarray:
    """uint8 (H0, W0, 3) -> float32 (3, H0, W0) in [-1, 1] (`ToTensor() * 2 - 1`)."""
    x = np.asarray(image)
    if x.dtype != np.uint8 or x.ndim != 3 or x.shape[2] != 3:
        raise ValueError(f"image must be uint8 (H, W, 3) RGB, got {x.dtype} {x.shape}")
    return (x.transpose(2, 0, 1).astype(np.float32) / np.float32(255)) * np.float32(2) - np.float32(1)


def cover_crop(image_hw: tuple[int, int], target_hw: tuple[int, int]) -> tuple[tuple[int, int], tuple[int, int]]:
    """(resize (h, w), crop (top, left)) that cover `target_hw` and centre-crop (see the module docstring).

    ValueError for an empty image or a degenerate crop (keeping less than 1/MAX_COVER_FACTOR of the
    resized image along one side)."""
    h0, w0 = (int(v) for v in image_hw)
    h, w = (int(v) for v in target_hw)
    if min(h0, w0) < 1 or min(h, w) < 1:
        raise ValueError(f"cannot crop an image of {h0} x {w0} to {h} x {w}: both must be non-empty")
    aspect, fact = w / h, w0 / h0
    scale = w / w0 if fact < aspect else h / h0
    rh, rw = int(round(h0 * scale)), int(round(w0 * scale))
    if rh < h or rw < w:  # the official assert; cannot happen with exact arithmetic
        raise ValueError(f"image {h0} x {w0} resized to {rh} x {rw} does not cover {h} x {w}")
    if rh > MAX_COVER_FACTOR * h or rw > MAX_COVER_FACTOR * w:
        raise ValueError(
            f"image {h0} x {w0} (aspect {fact:.3g}) is too unlike the video's {h} x {w} (aspect {aspect:.3g}): "
            f"covering it needs a {rh} x {rw} resize and the centre crop would keep under 1/{MAX_COVER_FACTOR} "
            "of it; crop the image closer to the video's aspect ratio or choose height/width to match it")
    return (rh, rw), ((rh - h) // 2, (rw - w) // 2)


def _aa_weights(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) float32 triangle-filter weights of torch's antialiased bilinear resize."""
    f32 = np.float32
    scale = f32(n_in) / f32(n_out)
    support = scale if scale >= 1 else f32(1)
    invscale = f32(1) / scale if scale >= 1 else f32(1)
    weights = np.zeros((n_out, n_in), np.float32)
    for i in range(n_out):
        center = scale * (f32(i) + f32(0.5))
        lo = max(int(center - support + f32(0.5)), 0)
        hi = min(int(center + support + f32(0.5)), n_in)
        j = np.arange(lo, hi, dtype=np.float32)
        w = np.maximum(f32(0), f32(1) - np.abs((j - center + f32(0.5)) * invscale)).astype(np.float32)
        total = w.sum(dtype=np.float32)
        weights[i, lo:hi] = w / total if total != 0 else w
    return weights


def resize_antialiased(x: np.ndarray, out_hw: tuple[int, int]) -> np.ndarray:
    """(c, H, W) float32 -> (c, h, w) float32: antialiased bilinear (see the module docstring)."""
    x = np.asarray(x, np.float32)
    h, w = out_hw
    ww = _aa_weights(x.shape[2], w).astype(np.float64)
    wh = _aa_weights(x.shape[1], h).astype(np.float64)
    x = np.einsum("chW,wW->chw", x.astype(np.float64), ww).astype(np.float32)
    return np.einsum("cHw,hH->chw", x.astype(np.float64), wh).astype(np.float32)


def preprocess(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """uint8 (H0, W0, 3) -> the VAE input (1, 1, 3, height, width) float32 in [-1, 1]."""
    x = to_unit_range(image)
    (rh, rw), (top, left) = cover_crop(x.shape[1:], (height, width))
    x = resize_antialiased(x, (rh, rw))
    return x[:, top:top + height, left:left + width][None, None]



def encode_condition(vae, video: jax.Array, noise: jax.Array) -> jax.Array:
    """The VAE posterior sample of one frame (pure, jittable): `video` (1, 1, 3, h, w) and N(0, 1)
    `noise` (1, 1, z, h/s, w/s) -> `mean + std * noise` (1, 1, z, h/s, w/s) float32. `vae`: a
    `VideoVAE`."""
    post = vae.posterior(vae.encode_moments(jnp.asarray(video, jnp.float32)))
    if tuple(noise.shape) != tuple(post.mean.shape):
        raise ValueError(f"posterior noise {tuple(noise.shape)} should be {tuple(post.mean.shape)}")
    return post.sample_from_noise(noise).astype(jnp.float32)


def posterior_noise(seed: int, shape: tuple[int, ...]) -> jax.Array:
    """The image posterior's N(0, 1) noise of prompt seed `seed`: its own stream, `fold_in(key(seed), 1)`
    (the initial noise uses `key(seed)`)."""
    return jax.random.normal(jax.random.fold_in(jax.random.key(int(seed)), 1), shape, jnp.float32)


def condition_frames(latent: jax.Array, latent_frames: int) -> jax.Array:
    """(b, 1, z, h', w') -> (b, latent_frames, z, h', w'): frame 0 the latent, zeros after, rounded to
    bfloat16 values (returned as float32). Training uses it on each sample's own first latent frame."""
    latent = jnp.asarray(latent, jnp.float32)
    if latent.ndim != 5 or latent.shape[1] != 1:
        raise ValueError(f"condition latent must be (b, 1, z, h, w), got {tuple(latent.shape)}")
    if latent_frames < 1:
        raise ValueError(f"latent_frames must be >= 1, got {latent_frames}")
    pad = jnp.zeros((latent.shape[0], latent_frames - 1, *latent.shape[2:]), jnp.float32)
    return jnp.concatenate([latent, pad], axis=1).astype(jnp.bfloat16).astype(jnp.float32)


def check_motion_score(value) -> float:
    """A finite real number (the official CLI passes an int by default, the model a float)."""
    try:
        ms = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"motion_score must be a finite number (e.g. 5, the TI2V default; higher: more "
                         f"motion), got {value!r}") from None
    if isinstance(value, bool) or not math.isfinite(ms):
        raise ValueError(f"motion_score must be a finite number (e.g. 5, the TI2V default; higher: more "
                         f"motion), got {value!r}")
    return ms
