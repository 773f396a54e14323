"""A small synthetic dataset in the on-disk format, for the tiny CPU config and the tests.

Each sample pairs a random "caption" (text states drawn from a per-sample seed) with a smooth random
latent video (a few low-frequency patterns per channel), so a small DiT can learn the mapping from
text to video in a few hundred CPU steps. The posterior log-variance is small (std 0.05), as for a
well-trained VAE.
"""
from __future__ import annotations

import numpy as np

from stepvideo_jax.data.format import write_dataset


def sample_arrays(rng: np.random.Generator, *, frames: int, channels: int, height: int, width: int,
                  text_length: int, clip_length: int, caption_channels: tuple[int, int],
                  text_valid: int) -> dict[str, np.ndarray]:
    """One sample: moments (f, c, h, w), y (l_text, d_llm), y_mask, clip (l_clip, d_clip)."""
    f, h, w = np.meshgrid(np.arange(frames), np.arange(height), np.arange(width), indexing="ij")
    phases = rng.uniform(0, 2 * np.pi, size=(channels, 3))
    freqs = rng.uniform(0.3, 1.2, size=(channels, 3))
    mean = np.stack([np.sin(freqs[c, 0] * f + phases[c, 0]) * np.cos(freqs[c, 1] * h + phases[c, 1])
                     + 0.5 * np.sin(freqs[c, 2] * w + phases[c, 2]) for c in range(channels)], axis=1)
    y = rng.normal(size=(text_length, caption_channels[0]))
    y[text_valid:] *= 0.1  # padded positions: ordinary but smaller encoder outputs
    y_mask = np.concatenate([np.ones(clip_length), np.arange(text_length) < text_valid]).astype(np.int32)
    return {"mean": mean.astype(np.float32), "logvar": np.full(mean.shape, 2 * np.log(0.05), np.float32),
            "y": y.astype(np.float32), "y_mask": y_mask,
            "clip": rng.normal(size=(clip_length, caption_channels[1])).astype(np.float32)}


def write(root, *, num_samples: int, buckets: tuple[tuple[int, int, int], ...], channels: int,
          text_length: int, clip_length: int, caption_channels: tuple[int, int], seed: int = 0) -> None:
    """`num_samples` samples spread round-robin over `buckets` of latent (frames, height, width)."""
    rng = np.random.default_rng(seed)
    kw = dict(channels=channels, text_length=text_length, clip_length=clip_length,
              caption_channels=tuple(caption_channels))

    def samples():
        for i in range(num_samples):
            f, h, w = buckets[i % len(buckets)]
            valid = int(rng.integers(1, text_length + 1))
            yield sample_arrays(rng, frames=f, height=h, width=w, text_valid=valid, **kw), f"synthetic {i}"

    negative = sample_arrays(np.random.default_rng(seed + 1), frames=1, height=1, width=1, text_valid=1, **kw)
    write_dataset(root, samples(), negative, latent_channels=channels, caption_channels=caption_channels,
                  text_length=text_length, clip_length=clip_length)
