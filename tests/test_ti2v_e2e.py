"""Step-Video-TI2V end to end against the official pipeline (fixture `ti2v`, e2e cases): prompt +
first-frame image -> uint8 frames, every stage compared at the fixture README's tolerances.

The TI2V release directory is assembled as the release publishes it: `transformer/` from the fixture's
`stepvideo-ti2v/`, `vae/`, `step_llm/`, `hunyuan_clip/` from `release_layout` (the README's recipe),
linked into one folder and read by `checkpoints.loader` (float32, as the fixture).
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from stepvideo_jax import checkpoints
from stepvideo_jax.sampling import components
from stepvideo_jax.sampling import image_condition as ic
from stepvideo_jax.sampling import pipeline as P
from stepvideo_jax.sampling.flow_matching import SamplerSettings, classifier_free_guidance
from tests.fixtures import assert_close, fixture_dir, load_json, load_npz

TEXT_TOL = dict(atol=5e-5, rtol=1e-4)
LATENT_TOL = dict(atol=2e-4, rtol=1e-4)
GUIDED_TOL = dict(atol=5e-4, rtol=1e-4)
COND_ATOL = 1e-4
VAE_IN_ATOL = 1e-6
pytestmark = pytest.mark.e2e


@functools.lru_cache(maxsize=None)
def e2e():
    return load_npz("ti2v", "e2e_cases.npz")


def cases():
    return sorted({k.split(".")[0] for k in e2e() if "." in k})


def ti2v_release(root):
    """A release folder: the TI2V transformer + the T2V text encoders and VAE (symlinked)."""
    release = root / "stepvideo-ti2v"
    release.mkdir(parents=True)
    (release / "transformer").symlink_to(fixture_dir("ti2v") / "stepvideo-ti2v" / "transformer")
    for name in ("vae", "step_llm", "hunyuan_clip"):
        (release / name).symlink_to(fixture_dir("release_layout") / "stepvideo-t2v" / name)
    return release


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    f32 = jnp.float32
    models = checkpoints.loader(ti2v_release(tmp_path_factory.mktemp("ti2v")), dit_dtype=f32,
                                vae_dtype=f32, llm_dtype=f32, clip_dtype=f32).models()
    assert models.dit.cfg.ti2v
    return models, P.TextToVideo(encode_text=models.text, dit=models.dit, decode=components.vae_decoder(models.vae),
                                 encode_image=components.vae_image_encoder(models.vae))


def _case(name):
    d = {k.split(".", 1)[1]: v for k, v in e2e().items() if k.startswith(name + ".")}
    size = P.VideoSize(int(d["num_frames"]), int(d["height"]), int(d["width"]))
    settings = SamplerSettings(int(d["num_inference_steps"]), float(d["guidance_scale"]), float(d["time_shift"]))
    return d, size, settings


@pytest.mark.slow
@pytest.mark.parametrize("name", cases())
def test_prompt_and_image_to_frames(pipe, name):
    d, size, settings = _case(name)
    models, ti2v = pipe
    prompt, pos, neg = str(d["prompt"]), str(e2e()["pos_magic"]), str(e2e()["neg_magic"])
    rows = P.caption_prompts([prompt], pos_magic=pos, neg_magic=neg, cfg=settings.cfg)
    assert rows == list(d["caption_prompts"])
    llm, clip = models.text.tokenize(rows)
    np.testing.assert_array_equal(llm.input_ids, d["llm_input_ids"])
    np.testing.assert_array_equal(clip.input_ids, d["clip_input_ids"])
    cond = models.text(rows)
    assert_close(cond["y"], d["y"], **TEXT_TOL, name=f"{name}.y")
    assert_close(cond["clip"], d["clip_embedding"], **TEXT_TOL, name=f"{name}.clip_embedding")
    np.testing.assert_array_equal(np.asarray(cond["y_mask"]), d["y_mask"])

    # image -> VAE input -> posterior -> condition
    png = load_json("ti2v", "e2e_cases.json")["cases"][name]["image_png"]
    image = ic.load_image(fixture_dir("ti2v") / png)
    np.testing.assert_array_equal(image, d["image"])
    video_in = ic.preprocess(image, size.height, size.width)
    assert_close(video_in, d["image_preprocessed"], atol=VAE_IN_ATOL, rtol=0, name=f"{name}.image_preprocessed")
    post = models.vae.posterior(models.vae.encode_moments(jnp.asarray(video_in)))
    assert_close(post.mean, d["posterior_mean"], atol=COND_ATOL, rtol=0, name=f"{name}.posterior_mean")
    assert_close(post.std, d["posterior_std"], atol=COND_ATOL, rtol=0, name=f"{name}.posterior_std")
    latent = ti2v.encode_image(jnp.asarray(video_in), jnp.asarray(d["posterior_noise"]))
    assert_close(latent, d["condition_latent"], atol=COND_ATOL, rtol=0, name=f"{name}.condition_latent")
    extra = ti2v.image_condition([image], float(d["motion_score"]), size=size, seeds=[int(d["seed"])],
                                 cfg=settings.cfg, image_noise=[d["posterior_noise"]])
    got, want = np.asarray(extra["condition"]), d["condition_hidden_states"]
    flips = got != want   # a float32 difference may flip one bf16 rounding (one ulp, ~0.4 % relative)
    assert np.all(np.abs(got - want)[flips] <= np.abs(want[flips]) * 2 ** -7), f"{name}: condition off by > 1 ulp"
    assert flips.mean() <= 0.01, f"{name}: {flips.sum()} condition values differ"
    np.testing.assert_array_equal(np.asarray(extra["motion_score"]), np.full(len(want), d["motion_score"]))

    # one DiT call per step on the recorded inputs
    velocity = jax.jit(P.dit_velocity_fn(ti2v.dit_graphdef))
    dit_cond = {"y": d["y"], "y_mask": d["y_mask"], "clip": d["clip_embedding"], "condition": want,
                "motion_score": np.full(len(want), d["motion_score"], np.float32)}
    for i in range(settings.num_steps):
        lat = d["initial_noise"] if i == 0 else d["latents"][i - 1]
        t = jnp.full((2 * len(lat),), d["timesteps"][i])
        raw = velocity(ti2v.dit_state, jnp.concatenate([lat, lat]), t, dit_cond)
        assert_close(raw, d["noise_pred_raw"][i], **LATENT_TOL, name=f"{name}.noise_pred_raw[{i}]")
        guided = classifier_free_guidance(raw, np.float32(settings.guidance_scale))
        assert_close(guided, d["noise_pred"][i], **GUIDED_TOL, name=f"{name}.noise_pred[{i}]")

    steps = {}
    out = ti2v([prompt], size=size, settings=settings, seeds=[int(d["seed"])], pos_magic=pos, neg_magic=neg,
               noise=jnp.asarray(d["initial_noise"]), images=[image], motion_score=float(d["motion_score"]),
               image_noise=[d["posterior_noise"]], on_step=lambda i, x: steps.__setitem__(i, np.array(x)))
    for i in range(settings.num_steps):
        assert_close(steps[i], d["latents"][i], **LATENT_TOL, name=f"{name}.latents[{i}]")
    assert_close(out.latents, d["final_latents"], **LATENT_TOL, name=f"{name}.final_latents")
    err = assert_close(out.video, d["video"], **LATENT_TOL, name=f"{name}.video")
    frames, want_frames = out.frames[0], d["frames"]
    assert frames.shape == want_frames.shape and frames.dtype == np.uint8
    diff = np.abs(frames.astype(np.int16) - want_frames.astype(np.int16))
    print(f"\n{name}: video max err {err:.2e}, frames differing {np.mean(diff > 0):.4%} (max {diff.max()})")
    assert diff.max() <= 1, f"{name}.frames: a value differs by {diff.max()}"
    assert np.mean(diff > 0) <= 0.005, f"{name}.frames: {np.mean(diff > 0):.3%} of the values differ"


def test_image_condition_rules(pipe):
    """Both CFG rows share the condition; no CFG: one row; the motion score changes the video; a
    T2V pipeline refuses images."""
    name = cases()[0]
    d, size, settings = _case(name)
    _, ti2v = pipe
    image = d["image"]
    kw = dict(size=size, seeds=[int(d["seed"])], image_noise=[d["posterior_noise"]])
    with_cfg = ti2v.image_condition([image], 5, cfg=True, **kw)
    without = ti2v.image_condition([image], 5, cfg=False, **kw)
    np.testing.assert_array_equal(with_cfg["condition"][:1], with_cfg["condition"][1:])
    np.testing.assert_array_equal(without["condition"], with_cfg["condition"][:1])
    assert np.all(np.asarray(without["condition"])[:, 1:] == 0)
    seeded = ti2v.image_condition([image], 5, cfg=False, size=size, seeds=[int(d["seed"])])
    assert not np.array_equal(seeded["condition"], without["condition"])   # its own seeded posterior noise
    for bad in (float("nan"), None):
        with pytest.raises(ValueError, match="motion_score"):
            ti2v.image_condition([image], bad, cfg=True, **kw)
    with pytest.raises(ValueError, match="one first-frame image per prompt"):
        ti2v.image_condition(None, 5, cfg=True, **kw)
