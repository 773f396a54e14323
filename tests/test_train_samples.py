"""Sample videos during training (`samples.every`, `samples.vae`) on the tiny config.

A few steps with sampling every 2 steps through the tiny release-layout VAE (the DiT's channels
are set to its z_channels) must leave latents and decodable mp4s of the expected frame count and size
for every sampled step, and must not change the training trajectory (same losses and final state
as the same run without sampling). `eval_every = 0`: the held-out prompts exist for sampling alone.
"""
import jax
import numpy as np
import pytest

from stepvideo_jax.convert import vae as vae_convert
from stepvideo_jax.models.vae import video_frames
from stepvideo_jax.sampling.video_io import read_mp4
from stepvideo_jax.training.loop import train
from tests.fixtures import fixtures_root, load_config

STEPS, EVERY = 4, 2


VAE_DIR = fixtures_root() / "release_layout" / "stepvideo-t2v" / "vae"


def config(channels=None, **overrides):
    """The tiny config with the DiT's latent channels equal to the fixture VAE's z_channels
    (or `channels`)."""
    c = vae_convert.read_config(VAE_DIR).z_channels if channels is None else channels
    defaults = {"stop_at_step": STEPS, "log_every": STEPS, "eval_every": 0, "checkpoint.every": STEPS,
                "checkpoint.async_save": False, "data.synthetic.buckets": ((3, 2, 2),),
                "model.in_channels": c, "model.out_channels": c, "data.synthetic.channels": c}
    return load_config("configs/train/tiny_cpu.py", **{**defaults, **overrides})


@pytest.fixture(scope="module")
def vae_dir():
    return VAE_DIR


@pytest.mark.slow
def test_samples_write_mp4s_and_leave_training_unchanged(tmp_path, vae_dir, compile_cache):
    sampled_cfg = config(**{"samples.every": EVERY, "samples.count": 2, "samples.num_steps": 2,
                            "samples.vae": str(vae_dir)})
    sampled = train(sampled_cfg, tmp_path / "sampled", printer=None)
    plain = train(config(), tmp_path / "plain", printer=None)

    losses = [h["loss"] for h in sampled.history]
    assert len(losses) == STEPS and np.isfinite(losses).all()
    np.testing.assert_array_equal(losses, [h["loss"] for h in plain.history])
    np.testing.assert_array_equal([h["grad_norm"] for h in sampled.history],
                                  [h["grad_norm"] for h in plain.history])
    for a, b in zip(jax.tree.leaves(sampled.state), jax.tree.leaves(plain.state)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    f, h, w = sampled_cfg.data.synthetic.buckets[0]
    vae_cfg = vae_convert.read_config(vae_dir)
    frames, size = video_frames(vae_cfg, f), (h * vae_cfg.spatial_factor, w * vae_cfg.spatial_factor)
    out = tmp_path / "sampled" / "samples"
    steps = list(range(EVERY, STEPS + 1, EVERY))
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [f"step_{s:08d}.npy" for s in steps] + [f"step_{s:08d}_{i}.mp4" for s in steps for i in range(2)])
    assert not (tmp_path / "plain" / "samples").exists()
    for s in steps:
        latents = np.load(out / f"step_{s:08d}.npy")
        assert latents.shape == (2, f, vae_cfg.z_channels, h, w) and np.isfinite(latents).all()
        videos = []
        for i in range(2):
            video, fps = read_mp4(out / f"step_{s:08d}_{i}.mp4")
            assert video.shape == (frames, *size, 3), video.shape
            assert fps > 0
            videos.append(video)
        # the two prompts (different noise rows) give different videos
        assert not np.array_equal(videos[0], videos[1])
    # EMA weights change between the sampled steps, so do the samples
    assert not np.array_equal(np.load(out / f"step_{EVERY:08d}.npy"), np.load(out / f"step_{STEPS:08d}.npy"))


def test_vae_latent_channels_must_match_the_dit(tmp_path, vae_dir):
    z = vae_convert.read_config(vae_dir).z_channels
    cfg = config(2 * z, **{"samples.every": EVERY, "samples.vae": str(vae_dir)})
    with pytest.raises(ValueError, match=rf"z_channels \({z}\) must be the DiT's in_channels \({2 * z}\)"):
        train(cfg, tmp_path, printer=None)
    assert not (tmp_path / "checkpoints").exists()
