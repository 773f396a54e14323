"""Preference data: building pairs from mp4 files + a JSONL of human choices, the pair dataset and
its batching, the synthetic preference set, and the errors for malformed inputs."""
import json

import numpy as np
import pytest

from stepvideo_jax.data import pipeline, synthetic_motion
from stepvideo_jax.data.format import DatasetError
from stepvideo_jax.data.preferences import (PAIRS_FILE, Choice, PairDataset, build, hashed_prompt_encoder, pool_encoder,
                                            read_choices, synthetic_choices, write_synthetic)
from stepvideo_jax.sampling.video_io import read_mp4, write_mp4

ENC = dict(encode_video=pool_encoder(channels=4, time_factor=4, space_factor=8),
           encode_prompt=hashed_prompt_encoder(text_length=6, clip_length=3, caption_channels=(8, 4)))
SYN = dict(frames=9, height=32, width=32, channels=4, time_factor=4, space_factor=8, text_length=6,
           clip_length=3, caption_channels=(8, 4))


def _mp4s(tmp_path):
    """Three renders of one prompt (one right, two wrong) and one of another prompt, as mp4 files."""
    red_left = synthetic_motion.Scene("red", "circle", "left")
    scenes = {"a.mp4": red_left, "b.mp4": synthetic_motion.Scene("blue", "circle", "left"),
              "c.mp4": synthetic_motion.Scene("red", "circle", "up"),
              "d.mp4": synthetic_motion.Scene("green", "square", "grows")}
    for name, scene in scenes.items():
        write_mp4(tmp_path / name, synthetic_motion.render(scene, frames=9, height=32, width=32, seed=3),
                  denoise=False)
    lines = [{"prompt": red_left.caption(), "chosen": "a.mp4", "rejected": "b.mp4"},
             {"prompt": red_left.caption(), "chosen": "a.mp4", "rejected": "c.mp4"},
             {"prompt": red_left.caption(), "chosen": "b.mp4", "rejected": "c.mp4", "tie": True},
             {"prompt": "a green square grows", "chosen": "d.mp4", "rejected": str(tmp_path / "a.mp4")}]
    (tmp_path / "choices.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return tmp_path / "choices.jsonl"


def test_pairs_from_mp4s_and_human_choices(tmp_path):
    choices = read_choices(_mp4s(tmp_path))
    assert len(choices) == 3                                     # the tie is skipped
    ds = build(tmp_path / "prefs", choices, load_video=lambda p: read_mp4(p)[0], **ENC)
    assert len(ds) == 3 and len(ds.videos) == 5                   # a.mp4 once per prompt it is rated for
    assert [json.loads(x)["chosen"] for x in (tmp_path / "prefs" / PAIRS_FILE).read_text().splitlines()] == [0, 0, 3]
    pair = ds.load(1)
    assert set(pair) == {"mean_w", "logvar_w", "mean_l", "logvar_l", "y", "y_mask", "clip"}
    assert pair["mean_w"].shape == pair["mean_l"].shape == (3, 4, 4, 4)
    np.testing.assert_array_equal(pair["mean_w"], ds.load(0)["mean_w"])
    assert not np.array_equal(pair["mean_w"], pair["mean_l"])
    assert ds.load(2)["y_mask"].sum() == 3 + 4                   # 3 CLIP positions + 4 words
    batch = next(pipeline.batches(ds, 2, seed=0, num_threads=1, prefetch=1))
    assert batch["mean_w"].shape == (2, 3, 4, 4, 4) and batch["y"].shape == (2, 6, 8)


def test_synthetic_pairs_differ_in_colour_or_motion(tmp_path):
    plan = synthetic_choices(12, seed=1)
    for i, (choice, good, bad, _) in enumerate(plan):
        assert choice.prompt == good.caption() and good.shape == bad.shape
        assert (good.colour != bad.colour) == (i % 2 == 0) and (good.motion != bad.motion) == (i % 2 == 1)
        assert good not in synthetic_motion.HELD_OUT
    ds = write_synthetic(tmp_path / "syn", num_pairs=4, seed=1, **SYN)
    assert len(ds) == 4 and ds.bucket(0) == (3, 4, 4)
    assert all(not np.array_equal(ds.load(i)["mean_w"], ds.load(i)["mean_l"]) for i in range(4))


def test_malformed_choices_and_pairs_are_named(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "x", "chosen": "a.mp4"}) + "\n")
    with pytest.raises(DatasetError, match=r"bad.jsonl:1: .*rejected"):
        read_choices(bad)
    bad.write_text("{not json\n")
    with pytest.raises(DatasetError, match="not JSON"):
        read_choices(bad)
    videos = {k: synthetic_motion.render(synthetic_motion.ALL_SCENES[i], frames=9, height=32, width=32, seed=0)
              for i, k in enumerate(["v0", "v1", "v2"])}
    videos["small"] = videos["v0"][:, :16, :16]

    with pytest.raises(DatasetError, match="same video"):
        build(tmp_path / "p0", [Choice("p", "v0", "v0")], load_video=videos.__getitem__, **ENC)
    with pytest.raises(DatasetError, match="different latent shapes"):
        build(tmp_path / "p2", [Choice("p", "v0", "small")], load_video=videos.__getitem__, **ENC)
    ds = build(tmp_path / "p3", [Choice("p", "v0", "v1"), Choice("q", "v2", "v1")], load_video=videos.__getitem__,
               **ENC)
    pairs = tmp_path / "p3" / PAIRS_FILE
    pairs.write_text(json.dumps({"chosen": 0, "rejected": 2}) + "\n")   # videos of two prompts
    with pytest.raises(DatasetError, match="one prompt"):
        PairDataset(tmp_path / "p3").load(0)
    pairs.write_text(json.dumps({"chosen": 0, "rejected": len(ds.videos)}) + "\n")
    with pytest.raises(DatasetError, match="indices in"):
        PairDataset(tmp_path / "p3")
    pairs.unlink()
    with pytest.raises(DatasetError, match="pairs.jsonl not found"):
        PairDataset(tmp_path / "p3")


def test_checkpoint_encoders_of_a_release_directory():
    """`checkpoint_encoders` (the tool's `--models`) on the fixture release directory, in float32: a
    prompt gives the official pipeline's recorded embeddings (fixture README tolerance) and a uint8
    video the VAE posterior of its [-1, 1] float version, one sample without its batch axis."""
    import jax.numpy as jnp

    from stepvideo_jax.convert import vae as vae_convert
    from stepvideo_jax.data.preferences import checkpoint_encoders
    from tests.fixtures import assert_close, fixture_dir, load_npz

    release = fixture_dir("release_layout") / "stepvideo-t2v"
    f32 = jnp.float32
    encode_video, encode_prompt = checkpoint_encoders(release, vae_dtype=f32, llm_dtype=f32, clip_dtype=f32)

    e2e = load_npz("release_layout", "e2e_cases.npz")
    case = sorted({k.split(".")[0] for k in e2e if "." in k})[0]
    for row, prompt in enumerate(e2e[f"{case}.caption_prompts"]):
        got = encode_prompt(str(prompt))
        assert set(got) == {"y", "y_mask", "clip"}
        assert got["y_mask"].dtype == np.int32 and got["y"].dtype == got["clip"].dtype == np.float32
        assert_close(got["y"], e2e[f"{case}.y"][row], atol=5e-5, rtol=1e-4, name=f"{case}.y[{row}]")
        assert_close(got["clip"], e2e[f"{case}.clip_embedding"][row], atol=5e-5, rtol=1e-4,
                     name=f"{case}.clip_embedding[{row}]")
        np.testing.assert_array_equal(got["y_mask"], e2e[f"{case}.y_mask"][row])

    vae = vae_convert.load(release / vae_convert.COMPONENT)
    s = vae.cfg.spatial_factor
    video = synthetic_motion.render(synthetic_motion.Scene("red", "circle", "left"), frames=1, height=s,
                                    width=2 * s, seed=0)
    mean, logvar = encode_video(video)
    post = vae.posterior(vae.encode_moments(jnp.asarray(synthetic_motion.to_model_range(video))[None]))
    assert mean.shape == logvar.shape == (1, vae.cfg.z_channels, 1, 2) and mean.dtype == np.float32
    np.testing.assert_allclose(mean, np.asarray(post.mean[0]), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(logvar, np.asarray(post.logvar[0]), rtol=1e-5, atol=1e-6)
