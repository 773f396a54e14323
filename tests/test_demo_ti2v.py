"""The TI2V demo build (`configs/demo/ti2v.py`, `demo.build.build_ti2v`): its initialisation from
the shipped T2V demo DiT, its default first frame, and the held-out evaluation's first-frame
inputs. The measured scores (not shipped: under the issue's 90 % bar) are in docs/ti2v.md.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from stepvideo_jax import checkpoints
from stepvideo_jax.data import synthetic_motion as sm
from stepvideo_jax.demo import build, evaluate
from stepvideo_jax.sampling.flow_matching import SamplerSettings
from stepvideo_jax.sampling.pipeline import VideoSize
from tests.fixtures import load_config


def _inputs(cfg, key, batch=2):
    """Random DiT inputs of `cfg`'s widths at the demo's latent size (3 x 2 x 2)."""
    k = jax.random.split(key, 5)
    x = jax.random.normal(k[0], (batch, 3, cfg.in_channels, 2, 2))
    y = jax.random.normal(k[1], (batch, 7, cfg.caption_channels[0]))
    clip = jax.random.normal(k[2], (batch, 5, cfg.caption_channels[1]))
    mask = jnp.ones((batch, 12), bool).at[:, -3:].set(False)
    return x, jnp.array([900.0, 40.0][:batch]), y, mask, clip, jax.random.normal(k[3], x.shape)


@pytest.mark.slow
def test_ti2v_init_computes_the_t2v_demo():
    """`ti2v_from_t2v`: whatever the condition and the motion score, the T2V demo's output, exactly;
    yet the condition and the score are wired (they change the output once their zero weights move)."""
    t2v = checkpoints.load_component(build.DEFAULT_EXPORT, "transformer")
    ti2v = build.ti2v_from_t2v(t2v)
    assert ti2v.cfg.ti2v and not t2v.cfg.ti2v
    x, t, y, mask, clip, cond = _inputs(t2v.cfg, jax.random.key(0))
    want = t2v(x, t, y, mask, clip)
    for score in (0.0, 5.0, 100.0):
        np.testing.assert_array_equal(ti2v(x, t, y, mask, clip, condition=cond, motion_score=score), want)
    kernel = ti2v.patch_embed.kernel
    kernel[...] = kernel[...].at[t2v.cfg.in_channels:].set(1.0)
    assert not np.allclose(ti2v(x, t, y, mask, clip, condition=cond, motion_score=5.0), want)
    with pytest.raises(ValueError, match="already TI2V"):
        build.ti2v_from_t2v(ti2v)


def test_default_first_frame_is_frame_0_of_a_held_out_render():
    config = load_config("configs/demo/ti2v.py")
    scene = sm.parse_caption(config.ti2v.image_caption)
    assert scene in sm.HELD_OUT
    v = config.video
    image = build.default_first_frame(config)
    assert image.shape == (v.height, v.width, 3) and image.dtype == np.uint8
    np.testing.assert_array_equal(image, sm.render(scene, frames=v.frames, height=v.height, width=v.width,
                                                   seed=config.ti2v.image_seed)[0])


def test_evaluation_gives_each_case_its_own_scene_frame():
    """`evaluate.evaluate(first_frame=...)`: every (caption, seed) case is generated with the image of
    its own scene and seed and the motion score, batches padded like the prompts."""
    calls = []

    class Recorder:
        def __call__(self, prompts, *, size, seeds, images, motion_score, **kw):
            calls.append((list(prompts), list(seeds), images, motion_score))
            frames = np.zeros((len(prompts), size.num_frames, size.height, size.width, 3), np.uint8)
            return type("Generation", (), {"frames": frames})()

    scenes, seeds = sm.HELD_OUT[:3], (7, 8)
    size = VideoSize(17, 32, 32)
    levels = {(s, seed): 10 * i + j for i, s in enumerate(scenes) for j, seed in enumerate(seeds)}

    def frame(scene, seed):
        return np.full((4, 4, 3), levels[(scene, seed)], np.uint8)

    result = evaluate.evaluate(Recorder(), scenes, size=size, settings=SamplerSettings(2, 4.0, 3.0), seeds=seeds,
                               batch=5, first_frame=frame, motion_score=3.5)
    todo = evaluate.cases(scenes, seeds)
    assert len(result["results"]) == len(todo) == len(scenes) * len(evaluate.LANGUAGES) * len(seeds)
    got = [(p, s, im) for prompts, ss, ims, _ in calls for p, s, im in zip(prompts, ss, ims)]
    for (caption, seed), (p, s, im) in zip(todo, got):
        assert (p, s) == (caption, seed)
        np.testing.assert_array_equal(im, frame(sm.parse_caption(caption), seed))
    assert all(len(ims) == 5 and ms == 3.5 for _, _, ims, ms in calls)
