r"""Reflow pairs for step distillation: the "stepvideo-reflow-v1" record format and its reader.

A teacher (any generation config) denoises the initial noise of each (prompt, seed) with its full
schedule; the pair is (noise z0, teacher latent z1, the prompt's text conditioning). The noise is
stored as its seed: `regenerate_noise(seed)` gives back exactly the sampler's
`sampling.pipeline.initial_noise` (threefry normal per seed, rounded to bfloat16 values), on the
training devices, at no storage cost. The job that writes a folder: `data/reflow_job.py`.

A dataset is a directory:
```
teacher.json    the job: the teacher's settings, the prompt list's sha256, seeds_per_prompt, seed
                (a folder belongs to one job; resuming with other settings is refused)
meta.json       {"format": "stepvideo-reflow-v1", "latent_channels": c, "caption_channels": [d_llm, d_clip],
                 "text_length": l_text, "clip_length": l_clip, "num_samples": n, "noise": ...}  (written last)
index.jsonl     one line per pair: {"file", "frames", "height", "width", "caption", "seed"} (latent sizes)
pairs/*.npz     one pair each: z1 (f, c, h, w) teacher latent, float32; seed () int64;
                y (l_text, d_llm), y_mask (l_clip + l_text,) int32, clip (l_clip, d_clip): the caption's
                conditioning (the prompt with the teacher's pos_magic), float32 or float16
negative.npz    the teacher's unconditional prompt (neg_magic) encoded: y, y_mask, clip (CFG dropout)
```
Pair `i` is (prompt `i // seeds_per_prompt`, seed `seed + i`). The grain pipeline
(`data/pipeline.py`) reads the directory through `ReflowDataset` as it reads a latents dataset;
a batch then holds `z1`, `seed` and the conditioning (`training/reflow.py` trains on it).
"""
from __future__ import annotations

import json
import os
import zipfile
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from stepvideo_jax.data import format as latents_format
from stepvideo_jax.data.format import DatasetError

FORMAT = "stepvideo-reflow-v1"
PAIR_KEYS = ("z1", "seed", "y", "y_mask", "clip")
TEACHER = "teacher.json"
NOISE = ("jax.random.normal(jax.random.key(seed), (1, f, c, h, w), float32) rounded to bfloat16 values "
         "(stepvideo_jax.sampling.pipeline.initial_noise)")
MAX_SEED = 2**31 - 1          # seeds travel as int32 in a batch


def regenerate_noise(seeds, row_shape: Sequence[int]):
    """(b, *row_shape) float32 noise of `seeds` (b,), equal to `initial_noise(seeds, (b, *row_shape))`;
    jittable (seeds may be traced int32)."""

    def row(seed):
        return jax.random.normal(jax.random.key(seed), (1, *row_shape), jnp.float32)[0]

    return jax.vmap(row)(jnp.asarray(seeds)).astype(jnp.bfloat16).astype(jnp.float32)


def pair_name(i: int) -> str:
    return f"pairs/{i:06d}.npz"


def check_pair(pair: Mapping[str, np.ndarray], meta: Mapping) -> None:
    """Raises `DatasetError` unless `pair` holds every array of `PAIR_KEYS` in the shapes of `meta`."""
    missing = [k for k in PAIR_KEYS if k not in pair]
    if missing:
        raise DatasetError(f"pair lacks arrays {missing}; a pair holds {PAIR_KEYS}")
    z1 = pair["z1"]
    if z1.ndim != 4 or z1.shape[1] != meta["latent_channels"]:
        raise DatasetError(f"z1 {z1.shape} should be (f, {meta['latent_channels']}, h, w)")
    seed = int(pair["seed"])
    if not 0 <= seed <= MAX_SEED:
        raise DatasetError(f"seed {seed} outside [0, {MAX_SEED}]")
    lt, lc = meta["text_length"], meta["clip_length"]
    dl, dc = meta["caption_channels"]
    for k, shape in {"y": (lt, dl), "y_mask": (lc + lt,), "clip": (lc, dc)}.items():
        if tuple(pair[k].shape) != shape:
            raise DatasetError(f"{k} has shape {tuple(pair[k].shape)}, meta says {shape}")


class ReflowDataset(latents_format.Dataset):
    """Read side of a reflow folder, with the interface of `data.format.Dataset` that the training
    loop and the grain pipeline use: `meta`, `records`, `teacher` (the job), `len`, `bucket(i)`,
    `load(i)` -> {z1, seed, y, y_mask, clip} (z1 float32, seed int32 scalar), `negative()` (batch
    1), `check()` (also requires each pair's `seed`)."""

    FORMAT = FORMAT
    KEYS = PAIR_KEYS
    WRITTEN_BY = "python -m stepvideo_jax.data.reflow_job (it also finishes an interrupted one)"

    def __init__(self, root: str | os.PathLike):
        super().__init__(root)
        self.teacher = json.loads((self.root / TEACHER).read_text())

    def _format_hint(self, got) -> str:
        return " (a latents dataset: train it with flow matching, configs/train/)" if got == latents_format.FORMAT else ""

    def _record_shapes(self, frames: int, height: int, width: int) -> dict[str, tuple[int, ...]]:
        return {"z1": (frames, self.meta["latent_channels"], height, width)}

    def _finish(self, record: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {**record, "z1": record["z1"].astype(np.float32), "seed": np.asarray(record["seed"], np.int32)}

    def _record_problems(self, path) -> list[str]:
        with path.open("rb") as fh, zipfile.ZipFile(fh) as z:
            return [] if "seed.npy" in z.namelist() else ["lacks array 'seed'"]


