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
    `first_frame(scene, seed)` the uint8 (h, w, 3) image of each case, and `motion_score`. With
    `first_frame`, every row also gets "start_offset_px" (`motion_checker.start_offset`: its frame 0
    against its image) and the summary "start" (`start_summary`); a text-to-video `pipe` is not given
    the images, only compared with them (where it starts on its own)."""
    todo = cases(scenes, seeds, languages)
    images = None
    if first_frame is not None:
        by_caption = {scene.caption(lang): scene for scene in scenes for lang in languages}
        images = [first_frame(by_caption[c], s) for c, s in todo]
    conditioned = images is not None and getattr(pipe, "ti2v", True)   # a TextToVideo says; others take them
    videos = generate(pipe, [c for c, _ in todo], [s for _, s in todo], size=size, settings=settings, batch=batch,
                      images=images if conditioned else None, motion_score=motion_score if conditioned else None)
    results = []
    for (caption, seed), video in zip(todo, videos):
        reading = motion_checker.read_video(video)
        results.append({"caption": caption, "seed": seed, **dataclasses.asdict(reading),
                        "ok": motion_checker.matches(reading, caption, motion_checker.COLOUR_MOTION),
                        "ok_with_shape": motion_checker.matches(reading, caption, motion_checker.FIELDS)})
    if images is not None:
        for row, video, image in zip(results, videos, images):
            row["start_offset_px"] = motion_checker.start_offset(video, image)
    return {**summarise(results), "results": results, "videos": videos}


def start_summary(offsets: Sequence[float | None]) -> dict:
    """{"mean_px" (over videos with an object), "within_2px" (fraction of all videos), "no_object"}."""
    found = [o for o in offsets if o is not None]
    return {"mean_px": float(np.mean(found)) if found else None,
            "within_2px": float(np.mean([o is not None and o <= 2.0 for o in offsets])),
            "no_object": len(offsets) - len(found)}


def by_seed(results: Sequence[dict], seeds: Sequence[int]) -> dict:
    """{str(seed): `summarise` of that seed's rows} for every seed (the keys as JSON writes them)."""
    return {str(s): summarise([r for r in results if r["seed"] == s]) for s in seeds}


def recorded(result: dict, seeds: Sequence[int]) -> dict:
    """`evaluate`'s result as a build records it: without the videos, with `by_seed`."""
    out = {k: v for k, v in result.items() if k != "videos"}
    out["by_seed"] = by_seed(out["results"], seeds)
    return out


def score_line(result: dict) -> str:
    """"colour+motion a, with shape b (n videos; by seed s: a/b, ...)" of a `recorded` result."""
    seeds = ", ".join(f"{s}: {r['accuracy']:.3f}/{r['accuracy_with_shape']:.3f}" for s, r in result["by_seed"].items())
    return (f"colour+motion {result['accuracy']:.3f}, with shape {result['accuracy_with_shape']:.3f} "
            f"({len(result['results'])} videos; by seed {seeds})")


def summarise(results: Sequence[dict]) -> dict:
    """Accuracies of `evaluate`'s result rows (any subset of them, e.g. one seed's)."""
    wanted = [sm.parse_caption(r["caption"]) for r in results]
    start = {"start": start_summary([r["start_offset_px"] for r in results])} if all(
        "start_offset_px" in r for r in results) else {}
    return {**start, "accuracy": float(np.mean([r["ok"] for r in results])),
            "accuracy_with_shape": float(np.mean([r["ok_with_shape"] for r in results])),
            "by_field": {f: float(np.mean([r[f] == getattr(w, f) for r, w in zip(results, wanted)]))
                         for f in motion_checker.FIELDS},
            "chance": motion_checker.CHANCE, "chance_with_shape": motion_checker.CHANCE_ALL}
