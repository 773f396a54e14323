"""Prompt following of a text-to-video model on the synthetic set, scored by the motion checker.

For every scene, caption language and seed, one video is generated (no magic prompt suffixes: the
demo is trained on bare captions and samples its unconditional rows with the empty prompt) and
`eval.motion_checker` reads its dominant object's colour, shape and motion. Chance is
`motion_checker.CHANCE` = 1 / (colours x motions) for colour and motion, `CHANCE_ALL` with the shape.
"""
from __future__ import annotations

import dataclasses
import itertools
from typing import Callable, Sequence

import numpy as np

from stepvideo_jax.data import synthetic_motion as sm
from stepvideo_jax.eval import motion_checker
from stepvideo_jax.sampling.flow_matching import SamplerSettings
from stepvideo_jax.sampling.pipeline import TextToVideo, VideoSize

EVAL_SEEDS = (1000,)
LANGUAGES = ("en", "zh")


def generate(pipe: TextToVideo, prompts: Sequence[str], seeds: Sequence[int], *, size: VideoSize,
             settings: SamplerSettings, batch: int = 24, images: Sequence[np.ndarray] | None = None,
             motion_score: float | None = None) -> list[np.ndarray]:
    """uint8 videos (f, h, w, 3), one per (prompt, seed), generated `batch` at a time (one
    compiled shape: the last batch is padded with its last prompt). TI2V DiT: `images` one uint8
    (h, w, 3) first frame per prompt and `motion_score`."""
    videos = []
    for start in range(0, len(prompts), batch):
        p, s = list(prompts[start:start + batch]), list(seeds[start:start + batch])
        n = len(p)
        p, s = p + [p[-1]] * (batch - n), s + [s[-1]] * (batch - n)
        extra = {}
        if images is not None:
            im = list(images[start:start + batch])
            extra = {"images": im + [im[-1]] * (batch - n), "motion_score": motion_score}
        result = pipe(p, size=size, settings=settings, seeds=s, pos_magic="", neg_magic="", crop=False, **extra)
        videos.extend(result.frames[:n])
    return videos


def cases(scenes: Sequence[sm.Scene], seeds: Sequence[int] = EVAL_SEEDS,
          languages: Sequence[str] = LANGUAGES) -> list[tuple[str, int]]:
    """(caption, seed) for every scene x language x seed."""
    return [(scene.caption(lang), seed) for scene, lang, seed in itertools.product(scenes, languages, seeds)]


def evaluate(pipe: TextToVideo, scenes: Sequence[sm.Scene], *, size: VideoSize, settings: SamplerSettings,
             seeds: Sequence[int] = EVAL_SEEDS, languages: Sequence[str] = LANGUAGES, batch: int = 48,
             first_frame: Callable[[sm.Scene, int], np.ndarray] | None = None,
             motion_score: float | None = None) -> dict:
    """{"accuracy" (colour and motion), "accuracy_with_shape" (colour, shape and motion), "by_field"
    ({field: fraction right}), "chance", "chance_with_shape", "results": [{"caption", "seed", "colour",
    "shape", "motion", "ok", "ok_with_shape"}]} and the videos under "videos". TI2V DiT:
    `first_frame(scene, seed)` the uint8 (h, w, 3) image of each case, and `motion_score`."""
    todo = cases(scenes, seeds, languages)
    images = None
    if first_frame is not None:
        by_caption = {scene.caption(lang): scene for scene in scenes for lang in languages}
        images = [first_frame(by_caption[c], s) for c, s in todo]
    videos = generate(pipe, [c for c, _ in todo], [s for _, s in todo], size=size, settings=settings, batch=batch,
                      images=images, motion_score=motion_score)
    results = []
    for (caption, seed), video in zip(todo, videos):
        reading = motion_checker.read_video(video)
        results.append({"caption": caption, "seed": seed, **dataclasses.asdict(reading),
                        "ok": motion_checker.matches(reading, caption, motion_checker.COLOUR_MOTION),
                        "ok_with_shape": motion_checker.matches(reading, caption, motion_checker.FIELDS)})
    return {**summarise(results), "results": results, "videos": videos}


def summarise(results: Sequence[dict]) -> dict:
    """Accuracies of `evaluate`'s result rows (any subset of them, e.g. one seed's)."""
    wanted = [sm.parse_caption(r["caption"]) for r in results]
    return {"accuracy": float(np.mean([r["ok"] for r in results])),
            "accuracy_with_shape": float(np.mean([r["ok_with_shape"] for r in results])),
            "by_field": {f: float(np.mean([r[f] == getattr(w, f) for r, w in zip(results, wanted)]))
                         for f in motion_checker.FIELDS},
            "chance": motion_checker.CHANCE, "chance_with_shape": motion_checker.CHANCE_ALL}
