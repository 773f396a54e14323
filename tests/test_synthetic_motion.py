"""The synthetic captioned-motion set and its checker: definition, splits and calibration."""
import dataclasses

import numpy as np
import pytest

from stepvideo_jax.data import synthetic_motion as sm
from stepvideo_jax.eval import motion_checker as mc

SIZES = dict(frames=17, height=64, width=64)


def test_captions_round_trip_in_both_languages():
    for scene in sm.ALL_SCENES:
        assert sm.parse_caption(scene.caption("en")) == scene
        assert sm.parse_caption(scene.caption("zh")) == scene
    assert len({s.caption("zh") for s in sm.ALL_SCENES}) == len(sm.ALL_SCENES)
    with pytest.raises(ValueError, match="not a caption"):
        sm.parse_caption("a purple hexagon spins")


def test_held_out_combinations_are_absent_from_training():
    assert len(sm.HELD_OUT) >= 16
    assert not set(sm.HELD_OUT) & set(sm.TRAIN_SCENES)
    assert set(sm.HELD_OUT) | set(sm.TRAIN_SCENES) == set(sm.ALL_SCENES)
    train_pairs = {(s.colour, s.motion) for s in sm.TRAIN_SCENES}
    assert {(s.colour, s.motion) for s in sm.HELD_OUT} <= train_pairs


def test_render_is_deterministic_and_shaped():
    scene = sm.ALL_SCENES[5]
    a = sm.render(scene, seed=3, **SIZES)
    b = sm.render(scene, seed=3, **SIZES)
    c = sm.render(scene, seed=4, **SIZES)
    assert a.shape == (17, 64, 64, 3) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, b)
    assert np.any(a != c)
    x = sm.to_model_range(a)
    assert x.shape == (17, 3, 64, 64) and x.min() >= -1 and x.max() <= 1


def test_checker_is_calibrated():
    """>= 95% on the set's own renders (colour and motion, and with the shape), about chance on
    shuffled captions (1/24 for colour and motion, 1/72 with the shape)."""
    rng = np.random.default_rng(0)
    videos, prompts = [], []
    for i, scene in enumerate(sm.ALL_SCENES * 2):
        videos.append(sm.render(scene, seed=i, **SIZES))
        prompts.append(scene.caption("en" if i % 2 else "zh"))
    assert mc.accuracy(videos, prompts) >= 0.95
    assert mc.accuracy(videos, prompts, mc.FIELDS) >= 0.95
    shuffled = [prompts[j] for j in rng.permutation(len(prompts))]
    acc_shuffled = mc.accuracy(videos, shuffled)
    assert acc_shuffled <= 3 * mc.CHANCE, acc_shuffled
    assert mc.accuracy(videos, shuffled, mc.FIELDS) <= 3 * mc.CHANCE_ALL
    noise = [rng.integers(0, 256, (17, 64, 64, 3), dtype=np.uint8) for _ in range(8)]
    assert mc.accuracy(noise, prompts[:8]) <= 0.25


# (frames, height, width, renders per scene): the demo's size, others of other aspect and scale
SHAPE_CASES = ((17, 32, 32, 6), (9, 48, 32, 1), (17, 64, 64, 1), (34, 64, 112, 1))


@pytest.mark.parametrize("frames,height,width,renders", SHAPE_CASES)
def test_checker_reads_every_field_of_ground_truth_renders(frames, height, width, renders):
    """Shape (circle / square / triangle from the object mask), colour and motion of every scene's
    renders at random seeds (drawn afresh each run, printed on failure): >= 99% on each field."""
    seed = int(np.random.default_rng().integers(2**31))
    rng = np.random.default_rng(seed)
    readings = [(scene, mc.read_video(sm.render(scene, frames=frames, height=height, width=width,
                                                seed=int(rng.integers(2**31)))))
                for scene in sm.ALL_SCENES for _ in range(renders)]
    for field in mc.FIELDS:
        misses = [(s, r) for s, r in readings if getattr(r, field) != getattr(s, field)]
        assert len(misses) <= 0.01 * len(readings), (field, seed, misses)
    shapes = {r.shape for _, r in readings}
    assert shapes == set(sm.SHAPES)


@pytest.mark.parametrize("blur", (0.5, 1.0, 1.25, 1.5))
def test_checker_reads_the_shape_of_blurred_renders(blur):
    """A decoder's output is soft-edged: renders blurred by a Gaussian (standard deviation `blur`
    pixels, also one between the checker's own) still read as their shape (>= 99%) at the demo's
    size. A sharp-template reader (`BLURS` = (0,)) read 61.5% at 1.5 pixels (measured); at 2 pixels
    the smallest triangles are round blobs to any reader."""
    from scipy import ndimage

    seed = int(np.random.default_rng().integers(2**31))
    rng = np.random.default_rng(seed)
    misses = []
    for scene in sm.ALL_SCENES:
        for _ in range(2):
            video = sm.render(scene, frames=17, height=32, width=32, seed=int(rng.integers(2**31))).astype(np.float64)
            video = np.round(ndimage.gaussian_filter(video, (0, blur, blur, 0))).astype(np.uint8)
            reading = mc.read_video(video)
            if reading.shape != scene.shape:
                misses.append((scene, reading))
    assert len(misses) <= 0.01 * 2 * len(sm.ALL_SCENES), (blur, seed, misses)


def test_checker_shape_ignores_colour_and_rejects_bad_fields():
    """The same geometry in every colour reads as the same shape; `fields` names its choices."""
    scene = sm.Scene("red", "triangle", "grows")
    for colour in sm.COLOURS:
        video = sm.render(dataclasses.replace(scene, colour=colour), seed=11, **SIZES)
        assert mc.read_video(video).shape == "triangle"
    with pytest.raises(ValueError, match="colour.*shape.*motion"):
        mc.score(video, scene.caption(), ("size",))


def test_vocabulary_warns_once_per_prompt_outside_the_set():
    from stepvideo_jax.demo import vocabulary

    captions = [s.caption(lang) for s in sm.ALL_SCENES for lang in ("en", "zh")]
    assert vocabulary.prompt_warnings("synthetic_motion", captions) == []
    lines = vocabulary.prompt_warnings("synthetic_motion", ["a purple  hexagon\ndances", captions[0], "一个紫色的六边形"])
    assert len(lines) == 2 and all("\n" not in line for line in lines)
    assert "unknown words: purple, hexagon, dances" in lines[0] and "unknown words" not in lines[1]
    for line in lines:
        assert all(name in line for name in [*sm.COLOURS, *sm.SHAPES, *(zh for _, zh in sm.COLOURS.values())])
    assert vocabulary.prompt_warnings("", ["a purple hexagon dances"]) == []
    with pytest.raises(ValueError, match="synthetic_motion"):
        vocabulary.prompt_warnings("demo", captions)
