"""Precompute job: mp4 + JSONL -> dataset, with stand-in encoders that record what they receive.

(The real encoders are the VAE's and text encoders' own tested modules; `release_encoders` wires
them in.)"""
import json

import numpy as np
import pytest

from stepvideo_jax.data import precompute as pc
from stepvideo_jax.data.format import Dataset
from stepvideo_jax.sampling.video_io import write_mp4

LT, LC, DL, DC, Z = 5, 3, 6, 4, 4


def _encoders(seen):
    def encode_video(video):
        seen.append(video)
        _, f, _, h, w = video.shape
        lat = video[0, ::4, :, ::8, ::8]  # (f', 3, h/8, w/8)
        mean = np.concatenate([lat, lat[:, :1]], axis=1)  # Z = 4 channels
        return mean, np.full_like(mean, -3.0)

    def encode_text(prompts):
        n = len(prompts)
        codes = np.array([[float(len(p))] for p in prompts], np.float32)
        return {"y": np.broadcast_to(codes[:, :, None], (n, LT, DL)).copy(),
                "y_mask": np.ones((n, LC + LT), np.int32),
                "clip": np.broadcast_to(codes[:, :, None], (n, LC, DC)).copy()}

    return encode_video, encode_text


def test_precompute_buckets_frames_and_pixels(tmp_path):
    (tmp_path / "v").mkdir()
    wide = np.zeros((11, 48, 96, 3), np.uint8)
    wide[:, :, 48:] = 255  # right half white
    tall = np.full((6, 96, 48, 3), 128, np.uint8)
    write_mp4(tmp_path / "v" / "wide.mp4", wide, denoise=False)
    write_mp4(tmp_path / "v" / "tall.mp4", tall, denoise=False)
    lines = [{"video": "wide.mp4", "caption": "a wide one"}, {"video": "tall.mp4", "caption": "tall"}]
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps(x) for x in lines))
    seen = []
    ev, et = _encoders(seen)
    n = pc.precompute(tmp_path / "v", tmp_path / "c.jsonl", tmp_path / "out", encode_video=ev, encode_text=et,
                      valid_frames=lambda k: k % 4 == 1, latent_channels=Z, buckets=((32, 64), (64, 32)),
                      num_frames=9, progress=False)
    assert n == 2
    ds = Dataset(tmp_path / "out")
    assert [r["caption"] for r in ds.records] == ["a wide one", "tall"]
    v_wide, v_tall = seen
    assert v_wide.shape == (1, 9, 3, 32, 64)   # 11 frames -> 9 (limit and validity), landscape bucket
    assert v_tall.shape == (1, 5, 3, 64, 32)   # 6 frames -> 5 (largest valid), portrait bucket
    assert v_wide.dtype == np.float32 and -1.0 <= v_wide.min() and v_wide.max() <= 1.0
    assert v_wide[0, :, :, :, :28].max() < -0.9 and v_wide[0, :, :, :, 36:].min() > 0.9  # left dark, right bright
    np.testing.assert_allclose(v_tall, 128 / 127.5 - 1, atol=0.03)
    assert ds.bucket(0) == (3, 4, 8) and ds.bucket(1) == (2, 8, 4)
    s = ds.load(0)
    assert s["y"].shape == (LT, DL) and float(s["y"][0, 0]) == len("a wide one")
    assert float(ds.negative()["y"][0, 0, 0]) == 0.0  # the empty negative prompt


def test_bucket_and_frame_helpers():
    assert pc.parse_buckets("544x992, 992x544") == ((544, 992), (992, 544))
    with pytest.raises(ValueError, match="HEIGHTxWIDTH"):
        pc.parse_buckets("544-992")
    assert pc.choose_bucket(720, 1280, ((544, 992), (992, 544), (768, 768))) == (544, 992)
    assert pc.choose_bucket(1000, 1000, ((544, 992), (992, 544), (768, 768))) == (768, 768)
    assert pc.usable_frames(300, 204, lambda k: k % 17 == 0) == 204
    with pytest.raises(ValueError, match="usable"):
        pc.usable_frames(3, 204, lambda k: k >= 17)


def _release():
    from tests.fixtures import fixture_dir

    return fixture_dir("release_layout") / "stepvideo-t2v"


@pytest.mark.slow
def test_release_encoders_reproduce_the_official_text_conditioning_and_the_vae():
    """`release_encoders` on the fixture release directory (float32): the text rows of an end-to-end
    case equal the official pipeline's recorded embeddings (fixture README tolerance), the latent
    channels are the VAE's z_channels, and videos encode to the VAE's posterior of that video."""
    import jax.numpy as jnp

    from stepvideo_jax.convert import vae as vae_convert
    from stepvideo_jax.models import vae as vae_model
    from tests.fixtures import assert_close, load_npz

    encode_video, encode_text, valid_frames, channels = pc.release_encoders(
        _release(), vae_dtype="float32", llm_dtype="float32")
    vae = vae_convert.load(_release() / vae_convert.COMPONENT)
    assert channels == vae.cfg.z_channels

    e2e = load_npz("release_layout", "e2e_cases.npz")
    case = sorted({k.split(".")[0] for k in e2e if "." in k})[0]
    cond = encode_text([str(p) for p in e2e[f"{case}.caption_prompts"]])
    assert all(isinstance(v, np.ndarray) for v in cond.values())
    assert cond["y"].dtype == cond["clip"].dtype == np.float32
    assert_close(cond["y"], e2e[f"{case}.y"], atol=5e-5, rtol=1e-4, name=f"{case}.y")
    assert_close(cond["clip"], e2e[f"{case}.clip_embedding"], atol=5e-5, rtol=1e-4, name=f"{case}.clip_embedding")
    np.testing.assert_array_equal(cond["y_mask"], e2e[f"{case}.y_mask"])

    for n in range(2 * vae.cfg.frame_len + 1):
        try:
            want = vae_model.latent_frames(vae.cfg, n) > 0
        except ValueError:
            want = False
        assert valid_frames(n) == want, f"{n} frames"
    s = vae.cfg.spatial_factor
    video = np.random.default_rng(0).uniform(-1, 1, (1, 1, vae.cfg.in_channels, s, 2 * s)).astype(np.float32)
    mean, logvar = encode_video(video)
    post = vae.posterior(vae.encode_moments(jnp.asarray(video)))
    assert mean.shape == logvar.shape == (1, vae.cfg.z_channels, 1, 2) and mean.dtype == np.float32
    np.testing.assert_allclose(mean, np.asarray(post.mean[0]), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(logvar, np.asarray(post.logvar[0]), rtol=1e-5, atol=1e-6)
