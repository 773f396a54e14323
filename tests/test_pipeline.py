"""Pipeline pieces: sizes, noise, prompts, post-processing, and the whole loop on toy components.

The toy pipeline uses a tiny random DiT (the real module), a deterministic stand-in text encoder and
a shape-exact stand-in decoder, so seeds, batching and compilation are tested in a few seconds.
"""
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from stepvideo_jax.models.dit import DiTConfig, StepVideoDiT
from stepvideo_jax.sampling import pipeline as P
from stepvideo_jax.sampling.flow_matching import SamplerSettings
from tests.fixtures import load_npz
from tests.test_flow_matching import count_compiles


@pytest.mark.parametrize("size, message", [
    ((30, 64, 96), "num_frames=30 must be a positive multiple of 17.*nearest valid: 17 or 34"),
    ((0, 64, 96), "num_frames=0 must be a positive multiple of 17.*nearest valid: 17"),
    ((204, 540, 960), "height=540 must be a positive multiple of 16.*nearest valid: 528 or 544"),
    ((204, 544, 970), "width=970 must be a positive multiple of 16.*nearest valid: 960 or 976"),
    ((17, 8, 96), "height=8 must be a positive multiple of 16.*nearest valid: 16"),
    ((17.0, 64, 96), "num_frames=17.0 must be an integer"),
])
def test_invalid_sizes_name_the_nearest_valid_values(size, message):
    with pytest.raises(ValueError, match=message):
        P.VideoSize(*size)


def test_latent_shapes_of_the_official_examples():
    assert P.VideoSize(204, 544, 992).latent_shape(1, 64) == (1, 36, 64, 34, 62)
    assert P.VideoSize(136, 544, 992).latent_shape(1, 64) == (1, 24, 64, 34, 62)
    assert P.VideoSize(204, 768, 768).latent_shape(1, 64) == (1, 36, 64, 48, 48)
    e2e = load_npz("release_layout", "e2e_cases.npz")
    for case in sorted({k.split(".")[0] for k in e2e if "." in k}):
        size = P.VideoSize(int(e2e[f"{case}.num_frames"]), int(e2e[f"{case}.height"]), int(e2e[f"{case}.width"]))
        noise = e2e[f"{case}.initial_noise"]
        assert size.latent_shape(noise.shape[0], noise.shape[2]) == noise.shape, case


def test_official_magic_strings():
    e2e = load_npz("release_layout", "e2e_cases.npz")
    assert P.POS_MAGIC == str(e2e["pos_magic"]) and P.NEG_MAGIC == str(e2e["neg_magic"])


def test_caption_prompts_order():
    rows = P.caption_prompts(["a", "b"], pos_magic="+", neg_magic="-", cfg=True)
    assert rows == ["a+", "b+", "-", "-"]
    assert P.caption_prompts(["a"], pos_magic="+", neg_magic="-", cfg=False) == ["a+"]
    e2e = load_npz("release_layout", "e2e_cases.npz")
    for case in sorted({k.split(".")[0] for k in e2e if "." in k}):
        assert P.caption_prompts([str(e2e[f"{case}.prompt"])], pos_magic=str(e2e["pos_magic"]),
                                 neg_magic=str(e2e["neg_magic"]), cfg=True) == list(e2e[f"{case}.caption_prompts"])


@pytest.mark.parametrize("prompts, message", [([], "no prompt given"), ([""], "prompt 0 is empty"),
                                              (["ok", "  "], "prompt 1 is empty")])
def test_empty_prompts_rejected(prompts, message):
    with pytest.raises(ValueError, match=message):
        P.check_prompts(prompts)


def test_noise_rows_depend_only_on_their_seed():
    shape = (3, 3, 4, 2, 5)
    a = P.initial_noise([7, 8, 9], shape)
    b = P.initial_noise([8], (1, *shape[1:]))
    np.testing.assert_array_equal(np.asarray(a[1]), np.asarray(b[0]))
    assert not np.array_equal(np.asarray(a[0]), np.asarray(a[1]))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(a.astype(jnp.bfloat16).astype(jnp.float32)))


def test_postprocess_reproduces_the_official_frames():
    """`frames` of both end-to-end cases from their `video`, bit for bit."""
    e2e = load_npz("release_layout", "e2e_cases.npz")
    for case in sorted({k.split(".")[0] for k in e2e if "." in k}):
        frames = P.crop_540p(P.postprocess(e2e[f"{case}.video"]))
        assert frames.dtype == np.uint8
        np.testing.assert_array_equal(frames, e2e[f"{case}.frames"], err_msg=case)


def test_postprocess_truncates_and_stacks_rows_along_height():
    video = np.zeros((2, 1, 3, 2, 2), np.float32)
    video[0] = 0.999          # (1.999) * 127.5 = 254.87 -> 254, not 255
    video[1] = -2.0           # clamped to -1 -> 0
    frames = P.postprocess(video)
    assert frames.shape == (1, 4, 2, 3)
    assert (frames[:, :2] == 254).all() and (frames[:, 2:] == 0).all()


def _official_crop(frames):
    """The official `crop2standard540p`, literally (negative starts and all)."""
    _, h, w, _ = frames.shape
    hc, wc = h // 2, w // 2
    if wc > hc:
        return frames[:, hc - 270:hc + 270, wc - 480:wc + 480]
    if wc < hc:
        return frames[:, hc - 480:hc + 480, wc - 270:wc + 270]
    return frames


@pytest.mark.parametrize("h, w, expected", [
    (544, 992, (540, 960)), (992, 544, (960, 540)), (768, 768, (768, 768)), (720, 1280, (540, 960)),
    (64, 96, (64, 96)), (80, 48, (80, 48)), (1088, 992, (960, 540)),
])
def test_crop_540p_matches_the_official_where_it_is_sensible(h, w, expected):
    frames = np.random.default_rng(0).integers(0, 255, (1, h, w, 3), dtype=np.uint8)
    out = P.crop_540p(frames)
    assert out.shape[1:3] == expected
    np.testing.assert_array_equal(out, _official_crop(frames))


def test_crop_540p_does_not_copy_the_official_wraparound():
    frames = np.zeros((1, 480, 848, 3), np.uint8)
    assert _official_crop(frames).shape[1:3] == (30, 56)
    assert P.crop_540p(frames).shape[1:3] == (480, 848)


# --- the whole loop on toy components -------------------------------------------------------

TOY = DiTConfig(num_layers=1, num_heads=2, head_dim=32, in_channels=4, out_channels=4,
                caption_channels=(16, 8), rope_splits=(16, 8, 8))
TEXT_LEN, CLIP_LEN = 6, 3


def toy_text_encoder(prompts):
    """Deterministic per-prompt embeddings (a function of the text only), valid lengths vary."""
    ys, clips, masks = [], [], []
    for p in prompts:
        key = jax.random.key(zlib.crc32(p.encode()))
        k1, k2 = jax.random.split(key)
        ys.append(jax.random.normal(k1, (TEXT_LEN, TOY.caption_channels[0])))
        clips.append(jax.random.normal(k2, (CLIP_LEN, TOY.caption_channels[1])))
        valid = 1 + len(p) % TEXT_LEN
        masks.append(jnp.concatenate([jnp.ones(CLIP_LEN), jnp.arange(TEXT_LEN) < valid]).astype(jnp.float32))
    return dict(y=jnp.stack(ys), y_mask=jnp.stack(masks), clip=jnp.stack(clips))


def toy_decode(latents):
    """(b, f, c, h, w) -> (b, f/3*17, 3, 16h, 16w): nearest-frame, 16x16 pixel repeat, tanh."""
    b, f, c, h, w = latents.shape
    frames = f // P.LATENT_FRAMES_PER_CHUNK * P.FRAMES_PER_CHUNK
    idx = jnp.arange(frames) * f // frames
    x = jnp.tanh(latents[:, idx, :3])
    return jnp.repeat(jnp.repeat(x, P.SPATIAL_FACTOR, axis=3), P.SPATIAL_FACTOR, axis=4)


@pytest.fixture(scope="module")
def toy_pipeline():
    dit = StepVideoDiT(TOY, rngs=nnx.Rngs(0))
    return P.TextToVideo(encode_text=toy_text_encoder, dit=dit, decode=toy_decode)


SIZE = P.VideoSize(17, 32, 48)
SETTINGS = SamplerSettings(num_steps=3, guidance_scale=7.0, shift=13.0)


def test_toy_generation_shapes_and_timings(toy_pipeline):
    out = toy_pipeline(["a cat", "a dog"], size=SIZE, settings=SETTINGS, seeds=[1, 2])
    assert out.latents.shape == SIZE.latent_shape(2, TOY.in_channels)
    assert out.video.shape == (2, 17, 3, 32, 48)
    assert [f.shape for f in out.frames] == [(17, 32, 48, 3)] * 2
    assert set(out.timings) == {"tokenize+encode", "denoise", "decode"}


def test_same_prompt_and_seed_same_video_whatever_the_batch(toy_pipeline):
    alone = toy_pipeline(["a cat"], size=SIZE, settings=SETTINGS, seeds=[5])
    again = toy_pipeline(["a cat"], size=SIZE, settings=SETTINGS, seeds=[5])
    np.testing.assert_array_equal(alone.latents, again.latents)
    batch = toy_pipeline(["a dog", "a cat", "a bird"], size=SIZE, settings=SETTINGS, seeds=[4, 5, 6])
    # XLA may block a matmul differently for another batch size: equal up to float32 rounding
    np.testing.assert_allclose(batch.latents[1], alone.latents[0], atol=5e-5, rtol=1e-5)
    other_seed = toy_pipeline(["a cat"], size=SIZE, settings=SETTINGS, seeds=[6])
    assert np.abs(other_seed.latents - alone.latents).max() > 0.1


def test_no_recompilation_for_new_prompts_and_seeds(toy_pipeline):
    toy_pipeline(["first prompt"], size=SIZE, settings=SETTINGS, seeds=[0])
    with count_compiles() as n:
        toy_pipeline(["a different prompt"], size=SIZE, settings=SamplerSettings(4, 5.0, 17.0), seeds=[9])
    assert n[0] == 0, f"{n[0]} compilation(s) for a new prompt of the same shape"


def test_guidance_one_encodes_only_cond_rows():
    seen = []

    def encoder(prompts):
        seen.append(list(prompts))
        return toy_text_encoder(prompts)

    pipe = P.TextToVideo(encode_text=encoder, dit=StepVideoDiT(TOY, rngs=nnx.Rngs(0)), decode=toy_decode)
    pipe(["x"], size=SIZE, settings=SamplerSettings(2, 1.0, 13.0), seeds=[0], pos_magic="!")
    assert seen == [["x!"]]


def test_bad_batch_inputs(toy_pipeline):
    with pytest.raises(ValueError, match="2 seeds for 1 prompts"):
        toy_pipeline(["a"], size=SIZE, settings=SETTINGS, seeds=[1, 2])
    with pytest.raises(ValueError, match="does not match the latent shape"):
        toy_pipeline(["a"], size=SIZE, settings=SETTINGS, seeds=[1], noise=jnp.zeros((1, 3, 4, 1, 1)))


@pytest.mark.sharding
def test_sharded_dit_under_a_mesh_matches_one_device(toy_pipeline):
    """Parameters placed by the logical-axis rules on a (data 2, fsdp 2, tensor 2) mesh of fake CPU
    devices; the pipeline runs under the mesh and gives the one-device latents."""
    from stepvideo_jax.parallel.mesh import MeshConfig, make_mesh, shard_model

    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2), jax.devices()[:8])
    dit = shard_model(StepVideoDiT(TOY, rngs=nnx.Rngs(0)), mesh)
    sharded = P.TextToVideo(encode_text=toy_text_encoder, dit=dit, decode=toy_decode, mesh=mesh)
    assert any(len(x.sharding.device_set) == 8 for x in jax.tree.leaves(sharded.dit_state))
    got = sharded(["a cat", "a dog"], size=SIZE, settings=SETTINGS, seeds=[1, 2])
    want = toy_pipeline(["a cat", "a dog"], size=SIZE, settings=SETTINGS, seeds=[1, 2])
    np.testing.assert_allclose(got.latents, want.latents, atol=5e-5, rtol=1e-5)


def test_a_vae_with_fewer_levels_sets_the_spatial_factor():
    """A VAE with 3 levels (the demo's) has 8 x 8 pixels per latent pixel: sizes are multiples of 8,
    the latents are h/8 x w/8, the pipeline over it (`components.text_to_video`) decodes the requested
    size, and a size made for another factor is refused before denoising."""
    from stepvideo_jax.models.vae import VAEConfig, VideoVAE
    from stepvideo_jax.sampling import components

    size = P.VideoSize(17, 24, 40, spatial_factor=8)
    assert size.latent_shape(2, 4) == (2, 3, 4, 3, 5)
    with pytest.raises(ValueError, match="height=20 must be a positive multiple of 8 .one latent pixel is 8 x 8"):
        P.VideoSize(17, 20, 40, spatial_factor=8)
    with pytest.raises(ValueError, match="spatial_factor=0 must be a positive integer"):
        P.VideoSize(17, 32, 32, spatial_factor=0)
    cfg = VAEConfig(z_channels=TOY.in_channels, encoder_stem=8, encoder_widths=(8, 8, 4 * TOY.in_channels),
                    decoder_widths=(8, 8, 4 * TOY.in_channels), encoder_temporal_levels=(0, 1),
                    decoder_temporal_levels=(1, 2), num_res_blocks=1, groups=1)
    assert cfg.spatial_factor == 8
    pipe = components.text_to_video(toy_text_encoder, StepVideoDiT(TOY, rngs=nnx.Rngs(0)),
                                    VideoVAE(cfg, rngs=nnx.Rngs(1)))
    out = pipe(["a cat"], size=size, settings=SamplerSettings(2, 1.0, 3.0), seeds=[0], crop=False)
    assert out.latents.shape == size.latent_shape(1, TOY.in_channels)
    assert out.video.shape == (1, 17, 3, 24, 40)
    with pytest.raises(ValueError, match="spatial_factor 16, but this pipeline's VAE turns 8 x 8 pixels"):
        pipe(["a cat"], size=P.VideoSize(17, 32, 48), settings=SamplerSettings(2, 1.0, 3.0), seeds=[0])
