"""On-disk format of pre-encoded training samples ("stepvideo-latents-v1").

A dataset is a directory:
```
meta.json       {"format": "stepvideo-latents-v1", "latent_channels": c, "caption_channels": [d_llm, d_clip],
                 "text_length": l_text, "clip_length": l_clip, "num_samples": n}
index.jsonl     one line per sample: {"file": "samples/000000.npz", "frames": f, "height": h, "width": w,
                 "caption": "..."}   (f, h, w are latent sizes: the bucket of the sample)
samples/*.npz   one sample each:
                  mean, logvar  (f, c, h, w)  VAE posterior moments (logvar already clamped)
                  y             (l_text, d_llm)  Step-LLM states, every position
                  y_mask        (l_clip + l_text,) int32, CLIP positions (all ones) first
                  clip          (l_clip, d_clip)  CLIP last hidden states, every position
negative.npz    the encoded negative/empty prompt: y, y_mask, clip as above (conditioning dropout)
```
Floating arrays are float32 or float16 (float16 halves the size; moments and text states fit its
range). Every step draws a fresh latent `mean + exp(logvar / 2) * eps` from the moments.
"""
from __future__ import annotations

import json
import os
import pathlib
from typing import Iterable, Mapping

import numpy as np

FORMAT = "stepvideo-latents-v1"
SAMPLE_KEYS = ("mean", "logvar", "y", "y_mask", "clip")
COND_KEYS = ("y", "y_mask", "clip")


class DatasetError(ValueError):
    pass


def _check_sample(sample: Mapping[str, np.ndarray], meta: Mapping) -> None:
    missing = [k for k in SAMPLE_KEYS if k not in sample]
    if missing:
        raise DatasetError(f"sample lacks arrays {missing}; a sample holds {SAMPLE_KEYS}")
    m, lv = sample["mean"], sample["logvar"]
    if m.ndim != 4 or m.shape != lv.shape or m.shape[1] != meta["latent_channels"]:
        raise DatasetError(f"mean {m.shape} / logvar {lv.shape} should both be (f, {meta['latent_channels']}, h, w)")
    _check_cond(sample, meta)


def _check_cond(cond: Mapping[str, np.ndarray], meta: Mapping) -> None:
    lt, lc = meta["text_length"], meta["clip_length"]
    dl, dc = meta["caption_channels"]
    want = {"y": (lt, dl), "y_mask": (lc + lt,), "clip": (lc, dc)}
    for k, shape in want.items():
        if tuple(cond[k].shape) != shape:
            raise DatasetError(f"{k} has shape {tuple(cond[k].shape)}, the dataset's meta.json says {shape}")


class Writer:
    """Writes a dataset directory sample by sample; `close()` writes meta.json last."""

    def __init__(self, root: str | os.PathLike, *, latent_channels: int, caption_channels: tuple[int, int],
                 text_length: int, clip_length: int, dtype=np.float32):
        self.root = pathlib.Path(root)
        (self.root / "samples").mkdir(parents=True, exist_ok=True)
        if (self.root / "meta.json").exists():
            raise DatasetError(f"{self.root} already holds a dataset (meta.json); choose an empty directory")
        self.meta = {"format": FORMAT, "latent_channels": int(latent_channels),
                     "caption_channels": [int(c) for c in caption_channels],
                     "text_length": int(text_length), "clip_length": int(clip_length), "num_samples": 0}
        self.dtype = np.dtype(dtype)
        if self.dtype not in (np.float32, np.float16):
            raise DatasetError(f"dtype {self.dtype} not supported; choose float32 or float16")
        self._index = open(self.root / "index.jsonl", "w")

    def _floats(self, arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {k: np.asarray(v, np.int32) if k == "y_mask" else np.asarray(v, self.dtype)
                for k, v in arrays.items()}

    def add(self, sample: Mapping[str, np.ndarray], caption: str = "") -> None:
        sample = self._floats({k: sample[k] for k in SAMPLE_KEYS if k in sample})
        _check_sample(sample, self.meta)
        name = f"samples/{self.meta['num_samples']:06d}.npz"
        np.savez(self.root / name, **sample)
        f, _, h, w = sample["mean"].shape
        self._index.write(json.dumps({"file": name, "frames": f, "height": h, "width": w,
                                      "caption": caption}, ensure_ascii=False) + "\n")
        self.meta["num_samples"] += 1

    def set_negative(self, cond: Mapping[str, np.ndarray]) -> None:
        cond = self._floats({k: cond[k] for k in COND_KEYS})
        _check_cond(cond, self.meta)
        np.savez(self.root / "negative.npz", **cond)

    def close(self) -> None:
        self._index.close()
        if not (self.root / "negative.npz").exists():
            raise DatasetError(f"{self.root}: set_negative() was never called; the dataset needs the "
                               "encoded negative prompt")
        (self.root / "meta.json").write_text(json.dumps(self.meta, indent=1))


class Dataset:
    """Read side: `meta`, `records` (index lines), `load(i)` -> sample dict, `negative()`."""

    def __init__(self, root: str | os.PathLike):
        self.root = pathlib.Path(root)
        meta_path = self.root / "meta.json"
        if not meta_path.is_file():
            raise DatasetError(f"{meta_path} not found: not a {FORMAT} dataset (write one with "
                               "stepvideo_jax.data.precompute)")
        self.meta = json.loads(meta_path.read_text())
        if self.meta.get("format") != FORMAT:
            raise DatasetError(f"{meta_path}: format {self.meta.get('format')!r}, expected {FORMAT!r}")
        with open(self.root / "index.jsonl") as f:
            self.records = [json.loads(line) for line in f if line.strip()]
        if len(self.records) != self.meta["num_samples"]:
            raise DatasetError(f"{self.root}: index.jsonl has {len(self.records)} lines, meta.json says "
                               f"{self.meta['num_samples']} samples")

    def __len__(self) -> int:
        return len(self.records)

    def bucket(self, i: int) -> tuple[int, int, int]:
        r = self.records[i]
        return r["frames"], r["height"], r["width"]

    def load(self, i: int) -> dict[str, np.ndarray]:
        with np.load(self.root / self.records[i]["file"]) as z:
            return {k: z[k] for k in SAMPLE_KEYS}

    def negative(self) -> dict[str, np.ndarray]:
        """The negative prompt's conditioning with a leading batch axis of 1."""
        with np.load(self.root / "negative.npz") as z:
            return {k: z[k][None] for k in COND_KEYS}


def write_dataset(root, samples: Iterable[tuple[Mapping[str, np.ndarray], str]], negative, **writer_kw) -> None:
    """Convenience: write (sample, caption) pairs and the negative conditioning in one call."""
    w = Writer(root, **writer_kw)
    for sample, caption in samples:
        w.add(sample, caption)
    w.set_negative(negative)
    w.close()
