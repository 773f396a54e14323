"""The synthetic captioned-motion set and its checker: definition, splits and calibration."""
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
    """>= 95% on the set's own renders, about chance (1/24) on shuffled captions."""
    rng = np.random.default_rng(0)
    videos, prompts = [], []
    for i, scene in enumerate(sm.ALL_SCENES * 2):
        videos.append(sm.render(scene, seed=i, **SIZES))
        prompts.append(scene.caption("en" if i % 2 else "zh"))
    assert mc.accuracy(videos, prompts) >= 0.95
    shuffled = [prompts[j] for j in rng.permutation(len(prompts))]
    acc_shuffled = mc.accuracy(videos, shuffled)
    assert acc_shuffled <= 3 * mc.CHANCE, acc_shuffled
    noise = [rng.integers(0, 256, (17, 64, 64, 3), dtype=np.uint8) for _ in range(8)]
    assert mc.accuracy(noise, prompts[:8]) <= 0.25
