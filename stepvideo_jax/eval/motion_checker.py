"""Scores a video against a synthetic-motion prompt: the dominant object's colour, shape and motion.

Written from the set's definition (`data/synthetic_motion.py`), not from a model: the object is the set
of pixels far from the background colour; its colour is the palette entry nearest to their median;
its motion is read from the trajectory of its centroid and the change of its area between the first
and last quarter of the clip; its shape is the set's shape whose coverage (`shape_coverage`, placed
at the object's centroid with the object's area, and blurred by the Gaussian of `BLURS` that fits
best) differs least from the object's own soft coverage, summed over the frames. The blur is there
because a decoder's output is soft-edged: a sharp template reads a blurred triangle as a circle.
Chance for a random video is 1 / (colours x motions) for colour and motion, 1 / (colours x shapes x
motions) for all three.
"""
from __future__ import annotations

import dataclasses

import numpy as np
from scipy import ndimage

from stepvideo_jax.data.synthetic_motion import BACKGROUND, COLOURS, MOTIONS, SHAPES, parse_caption, shape_coverage

FIELDS = ("colour", "shape", "motion")
COLOUR_MOTION = ("colour", "motion")
CHANCE = 1.0 / (len(COLOURS) * len(MOTIONS))
CHANCE_ALL = CHANCE / len(SHAPES)

# Per shape of `shape_coverage` with radius r: (area / r^2, centroid row - centre row in units of r).
# The triangle's centroid lies a third of the way from its base (at cy + r) to its apex (cy - r).
_GEOMETRY = {"circle": (np.pi, 0.0), "square": (4.0, 0.0), "triangle": (2.0, 1.0 / 3.0)}
assert set(_GEOMETRY) == set(SHAPES)
# Gaussian blurs (standard deviation in pixels) tried on each shape's template, one per video.
BLURS = (0.0, 0.5, 1.0, 1.5, 2.0)


@dataclasses.dataclass(frozen=True)
class Reading:
    colour: str | None
    shape: str | None
    motion: str | None


def _as_uint8_fhwc(video: np.ndarray) -> np.ndarray:
    video = np.asarray(video)
    if video.ndim != 4 or video.shape[-1] != 3:
        raise ValueError(f"video must be (f, h, w, 3), got {video.shape}")
    if video.dtype != np.uint8:
        video = np.clip((video.astype(np.float32) + 1.0) * 127.5, 0, 255).astype(np.uint8)
    return video


def _coverage(video: np.ndarray, mask: np.ndarray, median: np.ndarray) -> np.ndarray:
    """Soft object coverage (f, h, w) in [0, 1]: each pixel's projection on the background -> object
    colour line, scaled so that the object's fully covered pixels (90th percentile of the masked
    pixels' projections) read 1. Values under 0.1 (background noise) read 0."""
    bg = np.array(BACKGROUND, np.float32)
    direction = (median - bg) / max(float(np.linalg.norm(median - bg)), 1e-6)
    projection = (video - bg) @ direction
    full = max(float(np.percentile(projection[mask], 90)), 1e-6)
    alpha = np.clip(projection / full, 0.0, 1.0)
    return np.where(alpha < 0.1, 0.0, alpha)


def read_shape(alpha: np.ndarray, *, min_pixels: float = 4.0) -> str | None:
    """The set's shape closest to a soft coverage (f, h, w): per frame with at least `min_pixels` of
    coverage, every shape is placed at the coverage's centroid with its area and blurred by each of
    `BLURS`; the L1 differences (relative to the area, so that every frame counts alike) are summed
    over frames, and the shape of the best (shape, blur) pair wins."""
    f, h, w = alpha.shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64) + 0.5
    errors = {(shape, blur): 0.0 for shape in _GEOMETRY for blur in BLURS}
    frames = 0
    for a in alpha.astype(np.float64):
        area = a.sum()
        if area < min_pixels:
            continue
        frames += 1
        cy, cx = (a * yy).sum() / area, (a * xx).sum() / area
        for shape, (area_per_r2, centroid_offset) in _GEOMETRY.items():
            r = np.sqrt(area / area_per_r2)
            template = shape_coverage(shape, yy, xx, cy - centroid_offset * r, cx, r)
            for blur in BLURS:
                blurred = ndimage.gaussian_filter(template, blur, mode="constant") if blur else template
                errors[shape, blur] += np.abs(a - blurred).sum() / area
    if not frames:
        return None
    return min(errors, key=errors.get)[0]


def read_video(video: np.ndarray, *, min_pixels: int = 4) -> Reading:
    """Colour, shape and motion of the dominant object of a (f, h, w, 3) video (uint8, or float in
    [-1, 1])."""
    video = _as_uint8_fhwc(video).astype(np.float32)
    f, h, w, _ = video.shape
    dist = np.linalg.norm(video - np.array(BACKGROUND, np.float32), axis=-1)
    mask = dist > 60.0
    if mask.sum() < min_pixels * f:
        return Reading(None, None, None)
    names = list(COLOURS)
    palette = np.array([COLOURS[n][0] for n in names], np.float32)
    median = np.median(video[mask], axis=0)
    colour = names[int(np.argmin(np.linalg.norm(palette - median, axis=-1)))]
    shape = read_shape(_coverage(video, mask, median), min_pixels=min_pixels)

    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    area = mask.sum(axis=(1, 2)).astype(np.float32)
    present = area >= min_pixels
    if present.sum() < 2:
        return Reading(colour, shape, None)
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
    return Reading(colour, shape, motion)


def centroid(frame: np.ndarray, *, min_pixels: int = 4) -> np.ndarray | None:
    """(row, column) of the object in one (h, w, 3) frame (uint8, or float in [-1, 1]): the mean of
    the pixels `read_video` counts as object; None with fewer than `min_pixels`."""
    frame = _as_uint8_fhwc(np.asarray(frame)[None])[0].astype(np.float32)
    mask = np.linalg.norm(frame - np.array(BACKGROUND, np.float32), axis=-1) > 60.0
    if mask.sum() < min_pixels:
        return None
    return np.argwhere(mask).mean(axis=0)


def start_offset(video: np.ndarray, image: np.ndarray) -> float | None:
    """Pixels between the object's centroid in the video's frame 0 and in `image` (a first frame
    given to an image-to-video model); None when either shows no object. The fields above do not see
    where the object is; this reads whether a video starts from its image."""
    a, b = centroid(np.asarray(video)[0]), centroid(image)
    return None if a is None or b is None else float(np.hypot(*(a - b)))


def matches(reading: Reading, prompt: str, fields=COLOUR_MOTION) -> bool:
    """True when `reading` agrees with the prompt's scene on every one of `fields` (of `FIELDS`)."""
    unknown = set(fields) - set(FIELDS)
    if unknown or not fields:
        raise ValueError(f"fields {tuple(fields)!r}: choose a non-empty subset of {FIELDS}")
    want = parse_caption(prompt)
    return all(getattr(reading, name) == getattr(want, name) for name in fields)


def score(video: np.ndarray, prompt: str, fields=COLOUR_MOTION) -> bool:
    """True when the video's dominant object has the prompt's `fields` (default colour and motion)."""
    return matches(read_video(video), prompt, fields)


def accuracy(videos, prompts, fields=COLOUR_MOTION) -> float:
    """Fraction of (video, prompt) pairs whose `fields` all match."""
    results = [score(v, p, fields) for v, p in zip(videos, prompts, strict=True)]
    return float(np.mean(results)) if results else 0.0
