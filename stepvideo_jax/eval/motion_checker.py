"""Scores a video against a synthetic-motion prompt: is the dominant object's colour and motion right?

Written from the set's definition (`data/synthetic_motion.py`), not from a model: the object is the set
of pixels far from the background colour; its colour is the palette entry nearest to their median;
its motion is read from the trajectory of its centroid and the change of its area between the first
and last quarter of the clip. Chance level for a random video is 1 / (colours x motions).
"""
from __future__ import annotations

import dataclasses

import numpy as np

from stepvideo_jax.data.synthetic_motion import BACKGROUND, COLOURS, MOTIONS, parse_caption

CHANCE = 1.0 / (len(COLOURS) * len(MOTIONS))


@dataclasses.dataclass(frozen=True)
class Reading:
    colour: str | None
    motion: str | None


def _as_uint8_fhwc(video: np.ndarray) -> np.ndarray:
    video = np.asarray(video)
    if video.ndim != 4 or video.shape[-1] != 3:
        raise ValueError(f"video must be (f, h, w, 3), got {video.shape}")
    if video.dtype != np.uint8:
        video = np.clip((video.astype(np.float32) + 1.0) * 127.5, 0, 255).astype(np.uint8)
    return video


def read_video(video: np.ndarray, *, min_pixels: int = 4) -> Reading:
    """Colour and motion of the dominant object of a (f, h, w, 3) video (uint8, or float in [-1, 1])."""
    video = _as_uint8_fhwc(video).astype(np.float32)
    f, h, w, _ = video.shape
    dist = np.linalg.norm(video - np.array(BACKGROUND, np.float32), axis=-1)
    mask = dist > 60.0
    if mask.sum() < min_pixels * f:
        return Reading(None, None)
    names = list(COLOURS)
    palette = np.array([COLOURS[n][0] for n in names], np.float32)
    median = np.median(video[mask], axis=0)
    colour = names[int(np.argmin(np.linalg.norm(palette - median, axis=-1)))]

    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    area = mask.sum(axis=(1, 2)).astype(np.float32)
    present = area >= min_pixels
    if present.sum() < 2:
        return Reading(colour, None)
    cy = np.where(present, (mask * yy).sum(axis=(1, 2)) / np.maximum(area, 1), np.nan)
    cx = np.where(present, (mask * xx).sum(axis=(1, 2)) / np.maximum(area, 1), np.nan)
    q = max(f // 4, 1)
    first, last = slice(0, q), slice(f - q, f)
    dy = np.nanmean(cy[last]) - np.nanmean(cy[first])
    dx = np.nanmean(cx[last]) - np.nanmean(cx[first])
    growth = np.log(np.mean(area[last]) + 1.0) - np.log(np.mean(area[first]) + 1.0)
    # Displacement in units of the object's size, so that size changes and moves compare fairly.
    size = np.sqrt(np.mean(area[present]))
    shift = np.hypot(dx, dy) / max(size, 1.0)
    if abs(growth) > 0.35 and abs(growth) > shift:
        motion = "grows" if growth > 0 else "shrinks"
    elif shift > 0.25:
        motion = ("right" if dx > 0 else "left") if abs(dx) >= abs(dy) else ("down" if dy > 0 else "up")
    else:
        motion = None
    return Reading(colour, motion)


def score(video: np.ndarray, prompt: str) -> bool:
    """True when the video's dominant object has the prompt's colour and motion."""
    want = parse_caption(prompt)
    got = read_video(video)
    return got.colour == want.colour and got.motion == want.motion


def accuracy(videos, prompts) -> float:
    results = [score(v, p) for v, p in zip(videos, prompts, strict=True)]
    return float(np.mean(results)) if results else 0.0
