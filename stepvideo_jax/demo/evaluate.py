"""Prompt following of a text-to-video model on the synthetic set, scored by the motion checker.

For every scene, caption language and seed, one video is generated (no magic prompt suffixes: the
demo is trained on bare captions and samples its unconditional rows with the empty prompt) and
`eval.motion_checker.score` says whether its dominant object has the caption's colour and motion.
Chance is `motion_checker.CHANCE` = 1 / (colours x motions).
"""
from __future__ import annotations

import itertools
from typing import Sequence

import numpy as np

from stepvideo_jax.data import synthetic_motion as sm
from stepvideo_jax.eval import motion_checker
from stepvideo_jax.sampling.flow_matching import SamplerSettings
from stepvideo_jax.sampling.pipeline import TextToVideo, VideoSize

EVAL_SEEDS = (1000,)
LANGUAGES = ("en", "zh")


def generate(pipe: TextToVideo, prompts: Sequence[str], seeds: Sequence[int], *, size: VideoSize,
             settings: SamplerSettings, batch: int = 24) -> list[np.ndarray]:
    """uint8 videos (f, h, w, 3), one per (prompt, seed), generated `batch` at a time (one
    compiled shape: the last batch is padded with its last prompt)."""
    videos = []
    for start in range(0, len(prompts), batch):
        p, s = list(prompts[start:start + batch]), list(seeds[start:start + batch])
        n = len(p)
        p, s = p + [p[-1]] * (batch - n), s + [s[-1]] * (batch - n)
        result = pipe(p, size=size, settings=settings, seeds=s, pos_magic="", neg_magic="", crop=False)
        videos.extend(result.frames[:n])
    return videos


def cases(scenes: Sequence[sm.Scene], seeds: Sequence[int] = EVAL_SEEDS,
          languages: Sequence[str] = LANGUAGES) -> list[tuple[str, int]]:
    """(caption, seed) for every scene x language x seed."""
    return [(scene.caption(lang), seed) for scene, lang, seed in itertools.product(scenes, languages, seeds)]


def evaluate(pipe: TextToVideo, scenes: Sequence[sm.Scene], *, size: VideoSize, settings: SamplerSettings,
             seeds: Sequence[int] = EVAL_SEEDS, languages: Sequence[str] = LANGUAGES, batch: int = 48) -> dict:
    """{"accuracy", "chance", "results": [{"caption", "seed", "colour", "motion", "ok"}]} and the
    videos under "videos"."""
    todo = cases(scenes, seeds, languages)
    videos = generate(pipe, [c for c, _ in todo], [s for _, s in todo], size=size, settings=settings, batch=batch)
    results = []
    for (caption, seed), video in zip(todo, videos):
        reading = motion_checker.read_video(video)
        want = sm.parse_caption(caption)
        results.append({"caption": caption, "seed": seed, "colour": reading.colour, "motion": reading.motion,
                        "ok": reading.colour == want.colour and reading.motion == want.motion})
    accuracy = float(np.mean([r["ok"] for r in results]))
    return {"accuracy": accuracy, "chance": motion_checker.CHANCE, "results": results, "videos": videos}
