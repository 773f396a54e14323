"""A procedurally generated, captioned-motion video set (no download): one coloured shape that moves.

Every scene is a (colour, shape, motion) triple, captioned in English and Chinese, e.g.
"a red circle moves to the left" / "一个红色的圆形向左移动". Videos are rendered deterministically
from a seed: uint8 (f, h, w, 3), a dark background and one anti-aliased shape whose centre or size
changes linearly over the clip. Held-out combinations (`HELD_OUT`) never appear in training splits, so
a model's prompt following can be measured on combinations it has not seen.
"""
from __future__ import annotations

import dataclasses
import itertools
import re
from typing import Iterator

import numpy as np

COLOURS = {  # name -> (RGB, Chinese)
    "red": ((230, 40, 40), "红色"),
    "green": ((40, 200, 60), "绿色"),
    "blue": ((50, 90, 240), "蓝色"),
    "yellow": ((235, 220, 40), "黄色"),
}
SHAPES = {"circle": "圆形", "square": "正方形", "triangle": "三角形"}
MOTIONS = {  # name -> (English phrase, Chinese phrase)
    "left": ("moves to the left", "向左移动"),
    "right": ("moves to the right", "向右移动"),
    "up": ("moves up", "向上移动"),
    "down": ("moves down", "向下移动"),
    "grows": ("grows", "变大"),
    "shrinks": ("shrinks", "变小"),
}
BACKGROUND = (16, 16, 24)
# The object's starting radius as a fraction of the frame's shorter side. At 0.12-0.16 (the first
# demo's set) a 32 x 32 object was 8-10 pixels across and the demo VAE decoded every shape as a round
# blob (shape at chance in its reconstructions); at 0.18-0.22 the same VAE read 93% of shapes after
# 150 steps on it (docs/demo_model.md).
RADIUS = (0.18, 0.22)


@dataclasses.dataclass(frozen=True)
class Scene:
    colour: str
    shape: str
    motion: str

    def caption(self, language: str = "en") -> str:
        if language == "en":
            return f"a {self.colour} {self.shape} {MOTIONS[self.motion][0]}"
        if language == "zh":
            return f"一个{COLOURS[self.colour][1]}的{SHAPES[self.shape]}{MOTIONS[self.motion][1]}"
        raise ValueError(f"unknown language {language!r}; choose 'en' or 'zh'")


ALL_SCENES = tuple(Scene(c, s, m) for c, s, m in itertools.product(COLOURS, SHAPES, MOTIONS))
# 24 held-out combinations: each (colour, motion) pair once, with a rotating shape; every pair also
# appears in training with the two other shapes, so only the triple is new.
HELD_OUT = tuple(Scene(c, tuple(SHAPES)[(ci + mi) % len(SHAPES)], m)
                 for ci, c in enumerate(COLOURS) for mi, m in enumerate(MOTIONS))
TRAIN_SCENES = tuple(s for s in ALL_SCENES if s not in HELD_OUT)


def parse_caption(caption: str) -> Scene:
    """Inverse of `Scene.caption` for either language."""
    for scene in ALL_SCENES:
        if caption.strip() in (scene.caption("en"), scene.caption("zh")):
            return scene
    raise ValueError(f"not a caption of the synthetic set: {caption!r}")


def vocabulary_warning(prompt: str) -> str | None:
    """None for a caption of the set (`parse_caption` reads it); else one line (no line break)
    naming the prompt's words the set does not know, where it can tell them apart (English), and
    every word it knows, in both languages. For models trained on this set only (the demo)."""
    if any(prompt.strip() in (s.caption("en"), s.caption("zh")) for s in ALL_SCENES):
        return None
    known = {"a", *COLOURS, *SHAPES, *" ".join(en for en, _ in MOTIONS.values()).split()}
    unknown = list(dict.fromkeys(w for w in re.findall(r"[a-z]+", prompt.lower()) if w not in known))
    detail = f" (unknown words: {', '.join(unknown)})" if unknown else ""
    return (f"prompt {' '.join(prompt.split())!r} is not a caption the demo model was trained on{detail}; it knows "
            f"\"a <colour> <shape> <motion>\" with colours {', '.join(COLOURS)}; shapes {', '.join(SHAPES)}; "
            f"motions {', '.join(en for en, _ in MOTIONS.values())}; or in Chinese "
            f"\"一个<colour>的<shape><motion>\" with {', '.join(zh for _, zh in COLOURS.values())}; "
            f"{', '.join(SHAPES.values())}; {', '.join(zh for _, zh in MOTIONS.values())}. "
            "It still generates: expect whatever the model makes of it")


def shape_coverage(shape: str, yy, xx, cy, cx, r):
    """Soft coverage in [0, 1] of a shape of radius r centred at (cy, cx), 1-pixel anti-aliasing.

    yy, xx: pixel-centre coordinates (broadcastable). A circle of radius r, a square of side 2r, or a
    triangle with apex up whose base (width 2r) lies at cy + r and apex at cy - r.
    """
    if shape == "circle":
        d = np.sqrt((yy - cy) ** 2 + (xx - cx) ** 2) - r
    elif shape == "square":
        d = np.maximum(np.abs(yy - cy), np.abs(xx - cx)) - r
    elif shape == "triangle":  # apex up, base at cy + r
        d = np.maximum.reduce([yy - (cy + r),
                               (cy - r) - yy + 2 * np.abs(xx - cx)])
    else:
        raise ValueError(f"unknown shape {shape!r}; choose from {sorted(SHAPES)}")
    return np.clip(0.5 - d, 0.0, 1.0)


def render(scene: Scene, *, frames: int, height: int, width: int, seed: int) -> np.ndarray:
    """uint8 video (f, h, w, 3) of `scene`; the start position and size are drawn from `seed`."""
    rng = np.random.default_rng(seed)
    size = min(height, width)
    r0 = size * rng.uniform(*RADIUS)
    travel = size * rng.uniform(0.35, 0.45)
    cy0 = height / 2 + size * rng.uniform(-0.08, 0.08)
    cx0 = width / 2 + size * rng.uniform(-0.08, 0.08)
    u = np.linspace(-0.5, 0.5, frames)
    cy, cx, r = np.full(frames, cy0), np.full(frames, cx0), np.full(frames, r0)
    if scene.motion == "left":
        cx = cx0 - travel * u
    elif scene.motion == "right":
        cx = cx0 + travel * u
    elif scene.motion == "up":
        cy = cy0 - travel * u
    elif scene.motion == "down":
        cy = cy0 + travel * u
    elif scene.motion == "grows":
        r = r0 * (1.0 + 1.4 * (u + 0.5)) * 0.75
    elif scene.motion == "shrinks":
        r = r0 * (1.0 + 1.4 * (0.5 - u)) * 0.75
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64) + 0.5
    colour = np.array(COLOURS[scene.colour][0], np.float64)
    bg = np.array(BACKGROUND, np.float64)
    video = np.empty((frames, height, width, 3), np.uint8)
    for i in range(frames):
        a = shape_coverage(scene.shape, yy, xx, cy[i], cx[i], r[i])[..., None]
        video[i] = np.round(bg * (1 - a) + colour * a).astype(np.uint8)
    return video


def to_model_range(video_uint8: np.ndarray) -> np.ndarray:
    """uint8 (f, h, w, 3) -> float32 (f, 3, h, w) in [-1, 1] (the VAE's input layout per sample)."""
    return (video_uint8.astype(np.float32) / 127.5 - 1.0).transpose(0, 3, 1, 2)


def samples(scenes, *, frames: int, height: int, width: int, seed: int,
            languages=("en", "zh")) -> Iterator[tuple[Scene, str, np.ndarray]]:
    """Endless (scene, caption, uint8 video) stream, deterministic in `seed`."""
    rng = np.random.default_rng(seed)
    scenes = list(scenes)
    while True:
        scene = scenes[rng.integers(len(scenes))]
        lang = languages[rng.integers(len(languages))]
        yield scene, scene.caption(lang), render(scene, frames=frames, height=height, width=width,
                                                 seed=int(rng.integers(2**31)))
