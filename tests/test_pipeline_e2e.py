"""End to end against the official pipeline: fixture `release_layout`, prompt -> uint8 frames.

The release directory is converted in memory by the project's converters (`checkpoints.loader`,
float32 everywhere as in the fixture), and each case runs through `TextToVideo` from its prompt and
recorded initial noise (torch's generator cannot be reproduced). Every stage is compared with the
tolerances of the fixture README. Cases, sizes and settings come from `e2e_cases.npz`.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from stepvideo_jax import checkpoints
from stepvideo_jax.convert import conversion
from stepvideo_jax.sampling import components
from stepvideo_jax.sampling import pipeline as P
from stepvideo_jax.sampling.flow_matching import SamplerSettings, classifier_free_guidance
from tests.fixtures import assert_close, fixture_dir, load_npz
from tests.test_flow_matching import count_compiles

pytestmark = pytest.mark.e2e

FIXTURE = "release_layout"
TEXT_TOL = dict(atol=5e-5, rtol=1e-4)
LATENT_TOL = dict(atol=2e-4, rtol=1e-4)
GUIDED_TOL = dict(atol=5e-4, rtol=1e-4)


@functools.lru_cache(maxsize=None)
def e2e():
    return load_npz(FIXTURE, "e2e_cases.npz")


def cases():
    return sorted({k.split(".")[0] for k in e2e() if "." in k})


@functools.lru_cache(maxsize=None)
def pipe():
    f32 = jnp.float32
    models = checkpoints.loader(fixture_dir(FIXTURE) / "stepvideo-t2v", dit_dtype=f32, vae_dtype=f32,
                                llm_dtype=f32, clip_dtype=f32).models()
    return models, P.TextToVideo(encode_text=models.text, dit=models.dit,
                                 decode=components.vae_decoder(models.vae))


def _case(name):
    d = {k.split(".", 1)[1]: v for k, v in e2e().items() if k.startswith(name + ".")}
    size = P.VideoSize(int(d["num_frames"]), int(d["height"]), int(d["width"]))
    settings = SamplerSettings(int(d["num_inference_steps"]), float(d["guidance_scale"]), float(d["time_shift"]))
    return d, size, settings


@pytest.mark.parametrize("name", cases())
def test_prompt_to_frames(name):
    d, size, settings = _case(name)
    models, t2v = pipe()
    prompt, pos, neg = str(d["prompt"]), str(e2e()["pos_magic"]), str(e2e()["neg_magic"])
    rows = P.caption_prompts([prompt], pos_magic=pos, neg_magic=neg, cfg=settings.cfg)
    assert rows == list(d["caption_prompts"])

    llm, clip = models.text.tokenize(rows)
    np.testing.assert_array_equal(llm.input_ids, d["llm_input_ids"])
    np.testing.assert_array_equal(llm.attention_mask, d["llm_attention_mask"])
    np.testing.assert_array_equal(clip.input_ids, d["clip_input_ids"])
    np.testing.assert_array_equal(clip.attention_mask, d["clip_attention_mask"])
    cond = models.text(rows)
    assert_close(cond["y"], d["y"], **TEXT_TOL, name=f"{name}.y")
    assert_close(cond["clip"], d["clip_embedding"], **TEXT_TOL, name=f"{name}.clip_embedding")
    np.testing.assert_array_equal(np.asarray(cond["y_mask"]), d["y_mask"])

    # one DiT call per step on the recorded inputs
    velocity = jax.jit(P.dit_velocity_fn(t2v.dit_graphdef))
    for i in range(settings.num_steps):
        lat = d["initial_noise"] if i == 0 else d["latents"][i - 1]
        t = jnp.full((2 * len(lat),), d["timesteps"][i])
        raw = velocity(t2v.dit_state, jnp.concatenate([lat, lat]), t, {k: jnp.asarray(d[v]) for k, v in
                       (("y", "y"), ("y_mask", "y_mask"), ("clip", "clip_embedding"))})
        assert_close(raw, d["noise_pred_raw"][i], **LATENT_TOL, name=f"{name}.noise_pred_raw[{i}]")
        guided = classifier_free_guidance(raw, np.float32(settings.guidance_scale))
        assert_close(guided, d["noise_pred"][i], **GUIDED_TOL, name=f"{name}.noise_pred[{i}]")

    steps = {}
    out = t2v([prompt], size=size, settings=settings, seeds=[int(d["seed"])], pos_magic=pos, neg_magic=neg,
              noise=jnp.asarray(d["initial_noise"]), on_step=lambda i, x: steps.__setitem__(i, np.array(x)))
    for i in range(settings.num_steps):
        assert_close(steps[i], d["latents"][i], **LATENT_TOL, name=f"{name}.latents[{i}]")
    assert_close(out.latents, d["final_latents"], **LATENT_TOL, name=f"{name}.final_latents")
    assert_close(out.video, d["video"], **LATENT_TOL, name=f"{name}.video")

    frames, want = out.frames[0], d["frames"]
    assert frames.shape == want.shape and frames.dtype == np.uint8
    diff = np.abs(frames.astype(np.int16) - want.astype(np.int16))
    assert diff.max() <= 1, f"{name}.frames: a value differs by {diff.max()}"
    assert np.mean(diff > 0) <= 0.005, f"{name}.frames: {np.mean(diff > 0):.3%} of the values differ"


def test_a_new_prompt_of_the_same_shape_compiles_nothing():
    name = cases()[0]
    d, size, settings = _case(name)
    _, t2v = pipe()
    t2v(["warm-up prompt"], size=size, settings=settings, seeds=[0])
    with count_compiles() as n:
        t2v(["an entirely different prompt, longer than the first one"], size=size, settings=settings, seeds=[1])
    assert n[0] == 0, f"{n[0]} compilation(s) for a new prompt of the same shape"


def test_a_converted_checkpoint_holds_the_same_models(tmp_path):
    """`python -m stepvideo_jax.convert` output restores to exactly the release directory's models."""
    from flax import nnx


    ckpt = conversion.convert_release(fixture_dir(FIXTURE) / "stepvideo-t2v", tmp_path / "ckpt")
    f32 = jnp.float32
    converted = checkpoints.loader(ckpt, dit_dtype=f32, vae_dtype=f32, llm_dtype=f32, clip_dtype=f32).models()
    models, _ = pipe()
    pairs = {"dit": (nnx.state(converted.dit), nnx.state(models.dit)),
             "vae": (nnx.state(converted.vae), nnx.state(models.vae)),
             "step_llm": (converted.text.llm_state, models.text.llm_state),
             "clip": (converted.text.clip_state, models.text.clip_state)}
    for name, (got, want) in pairs.items():
        got, want = nnx.to_pure_dict(got), nnx.to_pure_dict(want)
        assert jax.tree.structure(got) == jax.tree.structure(want), name
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=name)
