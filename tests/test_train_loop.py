"""The training loop on the tiny config: learning, exact resume, NaN stop.

One straight run of N steps (the learning check: the held-out loss on fixed (noise, t) falls at
least 5x), then the same run stopped at N/2 and resumed from its checkpoint: same losses, same
data order, same parameters. Compiled programs are shared through a persistent compilation cache
(the runs compile identical programs).
"""
import pathlib

import jax
import numpy as np
import pytest
from flax import nnx

from stepvideo_jax import checkpoints
from stepvideo_jax.data import format as data_format
from stepvideo_jax.data import pipeline, synthetic
from stepvideo_jax.training.loop import NonFiniteLoss, train
from stepvideo_jax.training.metrics import read_jsonl
from tests.fixtures import load_config

ROOT = pathlib.Path(__file__).resolve().parents[1]
STEPS = 300


def tiny_config(**overrides):
    defaults = {"total_steps": STEPS, "log_every": 50, "eval_every": 50, "checkpoint.every": STEPS // 2}
    return load_config("configs/train/tiny_cpu.py", **{**defaults, **overrides})


@pytest.fixture(scope="module")
def straight(tmp_path_factory, compile_cache):
    workdir = tmp_path_factory.mktemp("straight")
    return workdir, train(tiny_config(**{"samples.every": STEPS, "samples.num_steps": 3}), workdir, printer=None)


@pytest.mark.slow
def test_tiny_config_learns(straight):
    workdir, result = straight
    curve = dict(result.heldout)
    assert sorted(curve) == list(range(0, STEPS + 1, 50))
    assert curve[STEPS] * 5 <= curve[0], f"held-out loss {curve[0]:.4f} -> {curve[STEPS]:.4f}: less than 5x"
    rows = read_jsonl(workdir / "metrics.jsonl")
    logged = [r for r in rows if "loss" in r]
    assert [r["step"] for r in logged] == list(range(50, STEPS + 1, 50))
    for key in ("loss", "grad_norm", "learning_rate", "step_time_s", "samples_per_s", "tokens_per_s"):
        assert all(np.isfinite(r[key]) for r in logged), key
    assert (workdir / "checkpoints" / str(STEPS)).is_dir()
    cfg = tiny_config()
    latents = np.load(workdir / "samples" / f"step_{STEPS:08d}.npy")
    assert latents.shape == (cfg.samples.count, *cfg.data.synthetic.buckets[0][:1], cfg.data.synthetic.channels,
                             *cfg.data.synthetic.buckets[0][1:]) and np.isfinite(latents).all()
    # generate-side loading: raw and EMA weights of the last checkpoint
    raw = checkpoints.load_dit(workdir)
    ema = checkpoints.load_dit(workdir, ema=True)
    k = np.asarray(raw.proj_out.kernel[...])
    np.testing.assert_array_equal(k, np.asarray(result.state.params["proj_out"]["kernel"][...]))
    assert not np.array_equal(k, np.asarray(ema.proj_out.kernel[...]))


@pytest.mark.slow
def test_exact_resume(straight, tmp_path, compile_cache):
    _, full = straight
    first = train(tiny_config(stop_at_step=STEPS // 2), tmp_path, printer=None)
    assert int(first.state.step) == STEPS // 2 and len(first.history) == STEPS // 2
    second = train(tiny_config(), tmp_path, printer=None)  # restarts from checkpoint STEPS/2
    assert [h["step"] for h in second.history] == list(range(STEPS // 2 + 1, STEPS + 1))
    resumed = first.history + second.history
    np.testing.assert_allclose([h["loss"] for h in resumed], [h["loss"] for h in full.history], rtol=1e-6)
    np.testing.assert_allclose([h["grad_norm"] for h in resumed], [h["grad_norm"] for h in full.history], rtol=1e-6)
    for a, b in zip(jax.tree.leaves(second.state), jax.tree.leaves(full.state)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, compile_cache):
    """A NaN sample in the third global batch; a checkpoint every step: the run stops at step 3 and
    step 2 is the latest checkpoint. Same shapes as the tiny run, so its compiled step is reused."""
    cfg = tiny_config()
    s, batch = cfg.data.synthetic, cfg.data.global_batch
    rng = np.random.default_rng(0)
    f, h, w = s.buckets[0]
    kw = dict(frames=f, height=h, width=w, channels=s.channels, text_length=s.text_length,
              clip_length=s.clip_length, caption_channels=tuple(s.caption_channels))
    samples = [synthetic.sample_arrays(rng, text_valid=3, **kw) for _ in range(4 * batch)]
    plan = pipeline.BatchPlan([(f, h, w)] * len(samples), batch, seed=cfg.data.seed)
    samples[plan[2][0]]["mean"][0, 0, 0, 0] = np.nan
    data_format.write_dataset(tmp_path / "data", [(x, "") for x in samples],
                              {k: samples[0][k] for k in data_format.COND_KEYS},
                              latent_channels=s.channels, caption_channels=tuple(s.caption_channels),
                              text_length=s.text_length, clip_length=s.clip_length)
    cfg = tiny_config(**{"data.path": str(tmp_path / "data"), "data.synthetic": None,
                         "checkpoint.every": 1, "checkpoint.keep": 10, "eval_every": 0})
    with pytest.raises(NonFiniteLoss, match="at step 3 .* last good checkpoint is step 2"):
        train(cfg, tmp_path / "run", printer=None)
    steps = sorted(int(p.name) for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == [1, 2]
    model = checkpoints.load_dit(tmp_path / "run")
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(nnx.state(model)))


@pytest.mark.slow
def test_export_of_a_training_checkpoint_loads_back(straight, tmp_path):
    from stepvideo_jax import export
    from stepvideo_jax.convert import dit as dit_convert
    from stepvideo_jax.convert import export_dit

    workdir, result = straight
    assert export.main(["--workdir", str(workdir), "--out", str(tmp_path / "transformer"), "--dtype", "float32",
                        "--ema"]) == 0
    back = nnx.state(dit_convert.load(tmp_path / "transformer"))
    # --release: a complete release directory around the export, as generate's checkpoint_dir
    from tests.fixtures import fixture_dir

    release = fixture_dir("release_layout") / "stepvideo-t2v"
    export_dit.link_release(release, tmp_path / "full")
    export_dit.export(checkpoints.load_dit(workdir), tmp_path / "full" / "transformer")
    assert checkpoints.check_checkpoint_dir(tmp_path / "full") == tmp_path / "full"
    assert (tmp_path / "full" / "vae").resolve() == (release / "vae").resolve()
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(result.state.ema)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.sharding
@pytest.mark.slow
def test_sharded_run_matches_the_single_device_run(straight, tmp_path, compile_cache):
    """The same run on 8 devices as (fsdp=4, sequence=2): same losses for the first steps."""
    _, full = straight
    cfg = tiny_config(**{"mesh": {"data": 1, "fsdp": 4, "sequence": 2, "tensor": 1}, "stop_at_step": 4,
                         "eval_every": 0})
    sharded = train(cfg, tmp_path, printer=None)
    assert any(len(x.sharding.device_set) == 8 for x in jax.tree.leaves(sharded.state.params))
    np.testing.assert_allclose([h["loss"] for h in sharded.history], [h["loss"] for h in full.history[:4]],
                               rtol=1e-5)
    np.testing.assert_allclose([h["grad_norm"] for h in sharded.history],
                               [h["grad_norm"] for h in full.history[:4]], rtol=1e-4)
