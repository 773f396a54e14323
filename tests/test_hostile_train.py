"""Hostile and unlucky inputs to training and the data jobs (issue 21, findings 8, 9, 11): each
test reproduces a probe and asserts the clear error, a prompt exit (no hang) and that nothing was
half-written or lost.

CI runs as root, which ignores permission bits, so an unwritable directory is simulated by a path
under a regular file, and a full disk by `RLIMIT_FSIZE` in a subprocess.
"""
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from stepvideo_jax import verify
from stepvideo_jax.checkpoints import load_dit
from stepvideo_jax.convert.errors import CheckpointError
from stepvideo_jax.data import format as data_format
from stepvideo_jax.data import precompute as pc
from stepvideo_jax.data import preferences, synthetic
from stepvideo_jax.models.dit import StepVideoDiT
from stepvideo_jax.training.loop import train
from stepvideo_jax.training.settings import dit_config
from stepvideo_jax.training.metrics import read_jsonl
from stepvideo_jax.training.startup import StartupError
from tests.fixtures import load_config

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = "configs/train/tiny_cpu.py"
TOTAL, FIRST = 8, 6          # the shared run stops at FIRST; resumed runs go on to TOTAL


def tiny_config(**overrides):
    base = {"total_steps": TOTAL, "optim.warmup_steps": 1, "log_every": 1, "eval_every": 0, "checkpoint.every": 2}
    return load_config(TINY, **{**base, **overrides})


def run_cli(workdir, *flags, timeout, file_size_limit=None):
    """`python -m stepvideo_jax.train` on the tiny config, files limited to `file_size_limit` bytes
    (RLIMIT_FSIZE, set in the child before it imports anything); a hang fails the test."""
    cfg = tiny_config()
    start = ("import resource, runpy; "
             f"resource.setrlimit(resource.RLIMIT_FSIZE, ({file_size_limit}, {file_size_limit})); "
             "runpy.run_module('stepvideo_jax.train', run_name='__main__', alter_sys=True)")
    launcher = ["-c", start] if file_size_limit else ["-m", "stepvideo_jax.train"]
    args = [sys.executable, *launcher, "--config", str(ROOT / TINY), "--workdir", str(workdir),
            f"--config.total_steps={cfg.total_steps}", "--config.optim.warmup_steps=1", "--config.log_every=1",
            "--config.eval_every=0", *flags]
    env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2")
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=env)


def complete_steps(directory: pathlib.Path) -> list[int]:
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit()) if directory.is_dir() else []


def corrupt_step(checkpoints: pathlib.Path, step: int) -> None:
    """Truncates the largest file of a checkpoint step to half (a torn or damaged write)."""
    big = max((f for f in (checkpoints / str(step)).rglob("*") if f.is_file()), key=lambda f: f.stat().st_size)
    with open(big, "r+b") as f:
        f.truncate(big.stat().st_size // 2)


# -- finding 8: unwritable checkpoint directory, save failures -------------------------------------

def test_unwritable_checkpoint_dir_is_refused_before_anything_starts(tmp_path):
    """Probe: the checkpoint directory cannot be created (before: a PermissionError/NotADirectoryError
    from Orbax's thread, then the process never exited)."""
    work = tmp_path / "run"
    work.mkdir()
    (work / "checkpoints").write_text("not a directory")
    proc = run_cli(work, timeout=120)
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 1 and last.startswith("train: error: the checkpoint directory"), proc.stderr[-2000:]
    assert "not writable" in last and "Traceback" not in proc.stderr
    assert (work / "checkpoints").read_text() == "not a directory"         # nothing replaced
    assert not (work / "metrics.jsonl").exists() and "step 1" not in proc.stdout
    # a workdir under a regular file: refused in-process too, before any model is built
    (tmp_path / "file").write_text("x")
    with pytest.raises(StartupError, match="workdir .*file/run is not writable"):
        train(tiny_config(), tmp_path / "file" / "run", printer=None)


@pytest.mark.slow   # a fresh process compiles the tiny step: ~15 s idle, ~45 s on a loaded machine
def test_a_failing_save_stops_the_run_promptly_with_one_line(tmp_path):
    """Probe: a full disk (RLIMIT_FSIZE below the checkpoint's size, above the small files the run
    writes first). Before: the run trained on until the next save, then died with thousands of
    lines; now the failed background save is found within a few steps and the run exits 1."""
    cfg = tiny_config()
    model = nnx.eval_shape(lambda: StepVideoDiT(dit_config(cfg.model), param_dtype=jnp.float32, rngs=nnx.Rngs(0)))
    param_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    limit = param_bytes // 2          # the checkpoint holds params, EMA and two Adam moments: ~4x this
    every, total = 20, 60
    work = tmp_path / "run"
    proc = run_cli(work, f"--config.total_steps={total}", f"--config.checkpoint.every={every}", timeout=300,
                   file_size_limit=limit)
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 1 and last.startswith("train: error: saving checkpoint step"), proc.stderr[-3000:]
    assert "the run stops" in last and len(last) < 800
    # besides Orbax's usual INFO/WARNING lines: its error records, one line each (before: ~1,000 lines)
    others = [x for x in proc.stderr.splitlines() if not re.match(r"[IW]\d{4} ", x)]
    assert "Traceback" not in proc.stderr and len(others) <= 20, others
    logged = [int(line.split(":")[0].split()[1]) for line in proc.stdout.splitlines() if line.startswith("step ")]
    assert logged and max(logged) < every, f"trained up to step {max(logged)} after the failed save"
    assert complete_steps(work / "checkpoints") == []                       # no half-written step counts
    assert all(p.stat().st_size <= limit for p in (work / "synthetic_data").rglob("*") if p.is_file())


# -- findings 9 and 11: corrupt latest checkpoint, metrics after a resume ---------------------------

@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory, compile_cache):
    """A tiny run stopped at step FIRST with checkpoints every 2 steps (keep 2: FIRST - 2, FIRST)."""
    work = tmp_path_factory.mktemp("stopped")
    train(tiny_config(stop_at_step=FIRST), work, printer=None)
    assert complete_steps(work / "checkpoints") == [FIRST - 2, FIRST]
    return work


@pytest.mark.slow
def test_corrupt_latest_checkpoint_is_named_and_the_previous_one_resumes(stopped_run, tmp_path, compile_cache):
    work = tmp_path / "run"
    shutil.copytree(stopped_run, work)
    corrupt_step(work / "checkpoints", FIRST)
    # fallback off: one clear error naming the step, nothing moved
    with pytest.raises(CheckpointError, match=f"checkpoint step {FIRST} in .* does not restore") as err:
        train(tiny_config(**{"checkpoint.fallback": False}), work, printer=None)
    assert len(str(err.value).splitlines()) == 1 and len(str(err.value)) < 800
    assert complete_steps(work / "checkpoints") == [FIRST - 2, FIRST]
    # the default (fallback on): resumes from the previous step, sets the bad one aside
    assert tiny_config().checkpoint.fallback is True
    lines = []
    result = train(tiny_config(), work, printer=lines.append)
    assert any(f"checkpoint step {FIRST} does not restore" in x for x in lines), lines
    assert f"resumed from {work / 'checkpoints'}/{FIRST - 2}" in lines
    assert (work / "checkpoints.corrupt" / str(FIRST)).is_dir()
    assert [h["step"] for h in result.history] == list(range(FIRST - 1, TOTAL + 1))
    # finding 11: the replayed steps are logged once
    assert [r["step"] for r in read_jsonl(work / "metrics.jsonl")] == list(range(1, TOTAL + 1))


def test_metrics_of_an_attempt_without_checkpoint_are_not_repeated(tmp_path, compile_cache):
    """A run that died before its first save left records; the restart logs every step once."""
    work = tmp_path / "run"
    work.mkdir()
    (work / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in (1, 2, 3)))
    train(tiny_config(stop_at_step=3), work, printer=None)
    rows = read_jsonl(work / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3] and all(r["loss"] != 1.0 for r in rows)


@pytest.mark.slow
def test_verify_checks_every_checkpoint_step(stopped_run, tmp_path, capsys):
    work = tmp_path / "run"
    shutil.copytree(stopped_run, work)
    assert verify.main(["--checkpoint", str(work)]) == 0
    out = capsys.readouterr().out
    assert f"step {FIRST}: ok" in out and f"step {FIRST - 2}: ok" in out and "DiT params" in out
    corrupt_step(work / "checkpoints", FIRST)
    assert verify.main(["--checkpoint", str(work)]) == 1
    err = capsys.readouterr().err
    assert f"verify: error: step {FIRST}: does not restore" in err and f"step {FIRST - 2}" not in err
    # generate/export side: loading the DiT of the corrupt step names it; an older step still loads
    with pytest.raises(CheckpointError, match=f"checkpoint step {FIRST} in .* does not restore .*stepvideo_jax.verify"):
        load_dit(work)
    assert load_dit(work, step=FIRST - 2) is not None


# -- finding 9: datasets ----------------------------------------------------------------------------

def write_tiny_dataset(root) -> data_format.Dataset:
    s = tiny_config().data.synthetic
    synthetic.write(root, num_samples=s.num_samples, buckets=tuple(tuple(b) for b in s.buckets), channels=s.channels,
                    text_length=s.text_length, clip_length=s.clip_length,
                    caption_channels=tuple(s.caption_channels), seed=s.seed)
    return data_format.Dataset(root)


def test_malformed_index_line_names_the_file_and_line(tmp_path):
    write_tiny_dataset(tmp_path / "d")
    index = tmp_path / "d" / "index.jsonl"
    lines = index.read_text().splitlines()
    lines[1] = lines[1][: len(lines[1]) // 2]                   # a cut line, after a blank line below
    index.write_text("\n" + "\n".join(lines) + "\n")
    with pytest.raises(data_format.DatasetError, match=r"d/index.jsonl:3: not JSON"):
        data_format.Dataset(tmp_path / "d")
    lines = index.read_text().splitlines()
    lines[2] = json.dumps({"file": "../../etc/passwd", "frames": 1, "height": 1, "width": 1})
    index.write_text("\n".join(lines) + "\n")
    with pytest.raises(data_format.DatasetError, match=r"index.jsonl:3: file .* relative path inside"):
        data_format.Dataset(tmp_path / "d")


@pytest.mark.parametrize("damage", ["missing", "shape"])
def test_inconsistent_dataset_is_refused_before_the_run_starts(tmp_path, damage):
    ds = write_tiny_dataset(tmp_path / "d")
    victim = len(ds) - 1
    path = ds.root / ds.records[victim]["file"]
    if damage == "missing":
        path.unlink()
        expect = f"{path.name} \\(index.jsonl line {victim + 1}\\) is missing"
    else:
        arrays = ds.load(victim)
        arrays["mean"] = arrays["logvar"] = np.concatenate([arrays["mean"]] * 2)   # another frame count
        np.savez(path, **arrays)
        expect = f"{path.name} \\(index.jsonl line {victim + 1}\\): mean has shape"
    cfg = tiny_config(**{"data.path": str(ds.root)})
    with pytest.raises(data_format.DatasetError, match=expect):
        train(cfg, tmp_path / "run", printer=None)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()                # before the run began
    assert not (tmp_path / "run" / "dit_config.json").exists()
    assert verify.main(["--dataset", str(ds.root)]) == 1


def test_a_data_path_is_honoured_not_ignored(tmp_path):
    """tiny_cpu.py has a synthetic set; before, --config.data.path was ignored (even a missing one)."""
    with pytest.raises(data_format.DatasetError, match="nowhere/meta.json not found"):
        train(tiny_config(**{"data.path": str(tmp_path / "nowhere")}), tmp_path / "run", printer=None)
    assert not (tmp_path / "run" / "synthetic_data").exists()


def test_verify_reads_every_array(tmp_path, capsys):
    ds = write_tiny_dataset(tmp_path / "d")
    assert verify.main(["--dataset", str(ds.root)]) == 0
    arrays = ds.load(0)
    arrays["y"] = np.full_like(arrays["y"], np.nan)      # right shapes, headers fine: only a full read sees it
    np.savez(ds.root / ds.records[0]["file"], **arrays)
    ds.check()                                           # the start-up check reads headers only
    assert verify.main(["--dataset", str(ds.root)]) == 1
    assert "y holds NaN or inf" in capsys.readouterr().err


# -- finding 9: precompute and preferences jobs -----------------------------------------------------

def _never(*_):
    raise AssertionError("an encoder ran although the input was bad")


def test_precompute_checks_inputs_first_and_writes_atomically(tmp_path):
    from stepvideo_jax.sampling.video_io import write_mp4
    from tests.test_data_precompute import _encoders

    (tmp_path / "v").mkdir()
    write_mp4(tmp_path / "v" / "a.mp4", np.zeros((9, 32, 64, 3), np.uint8), denoise=False)
    captions = tmp_path / "c.jsonl"
    kw = dict(valid_frames=lambda k: k % 4 == 1, latent_channels=4, buckets=((32, 64),), num_frames=9,
              progress=False)
    captions.write_text('{"video": "a.mp4", "caption": "x"}\n\n{"video": "gone.mp4", "caption": "y"}\n')
    with pytest.raises(data_format.DatasetError, match=r"c.jsonl:3: video .*gone.mp4 not found"):
        pc.precompute(tmp_path / "v", captions, tmp_path / "out", encode_video=_never, encode_text=_never, **kw)
    captions.write_text('{"video": "a.mp4", "caption": "x"}\n{"video": "a.mp4", caption}\n')
    with pytest.raises(data_format.DatasetError, match=r"c.jsonl:2: not JSON"):
        pc.precompute(tmp_path / "v", captions, tmp_path / "out", encode_video=_never, encode_text=_never, **kw)
    with pytest.raises(SystemExit):
        pc.main(["--videos", str(tmp_path / "v"), "--captions", str(captions), "--release", str(tmp_path),
                 "--out", str(tmp_path / "out")])
    # an encoder failing on the second video: no dataset, no staging directory left behind
    captions.write_text('{"video": "a.mp4", "caption": "x"}\n{"video": "a.mp4", "caption": "y"}\n')
    seen = []
    encode_video, encode_text = _encoders(seen)

    def fails_second(video):
        if seen:
            raise RuntimeError("encoder died")
        return encode_video(video)

    with pytest.raises(RuntimeError, match="encoder died"):
        pc.precompute(tmp_path / "v", captions, tmp_path / "out", encode_video=fails_second, encode_text=encode_text,
                      **kw)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.jsonl", "v"]
    # an existing non-empty output is refused before any work
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(data_format.DatasetError, match="not an empty directory"):
        pc.precompute(tmp_path / "v", captions, tmp_path / "out", encode_video=_never, encode_text=_never, **kw)
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"


def test_preferences_build_checks_inputs_first_and_writes_atomically(tmp_path, monkeypatch):
    choices = tmp_path / "choices.jsonl"
    choices.write_text(json.dumps({"prompt": "p", "chosen": "a.mp4", "rejected": "gone.mp4"}) + "\n")
    monkeypatch.setattr(preferences, "checkpoint_encoders", _never)
    with pytest.raises(SystemExit):
        preferences.main(["--choices", str(choices), "--models", str(tmp_path), "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()
    from stepvideo_jax.data import synthetic_motion

    video = synthetic_motion.render(synthetic_motion.ALL_SCENES[0], frames=9, height=32, width=32, seed=0)

    def load(key):
        if key == "broken":
            raise OSError("cannot decode broken")
        return video

    enc = dict(encode_video=preferences.pool_encoder(channels=4, time_factor=4, space_factor=8),
               encode_prompt=preferences.hashed_prompt_encoder(text_length=6, clip_length=3, caption_channels=(8, 4)))
    plan = [preferences.Choice("p", "v0", "v1"), preferences.Choice("q", "v0", "broken")]
    with pytest.raises(OSError, match="cannot decode"):
        preferences.build(tmp_path / "prefs", plan, load_video=load, **enc)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["choices.jsonl"]


def test_startup_dataset_check_is_presence_only_on_remote_paths(tmp_path):
    from stepvideo_jax.training import startup

    ds = write_tiny_dataset(tmp_path / "d")
    arrays = ds.load(0)
    arrays["clip"] = arrays["clip"][:-1]                        # a header disagreement
    np.savez(ds.root / ds.records[0]["file"], **arrays)
    with pytest.raises(data_format.DatasetError, match="clip has shape"):
        startup.check_dataset(ds, str(ds.root))
    startup.check_dataset(ds, "gs://bucket/d")                  # index + presence only
    startup.check_dataset(ds, str(ds.root), headers=False)
    (ds.root / ds.records[1]["file"]).unlink()
    with pytest.raises(data_format.DatasetError, match="is missing"):
        startup.check_dataset(ds, "gs://bucket/d")


def test_metrics_discard_after_on_every_kind_of_workdir(tmp_path, monkeypatch):
    """A local file, a bucket URI (rewritten whole) and process 1 of a pod (writes nothing)."""
    from stepvideo_jax.training.metrics import MetricsWriter
    from tests.test_paths import fake_gcs

    with fake_gcs(tmp_path / "gcs"):
        for workdir in (tmp_path / "local", "gs://bucket/run"):
            writer = MetricsWriter(workdir, printer=None)
            for step in (1, 2, 3, 4):
                writer.write(step, {"loss": float(step)})
            assert writer.discard_after(2) == 2
            writer.write(3, {"loss": 30.0})
            writer.close()
            rows = read_jsonl(f"{workdir}/metrics.jsonl")
            assert [(r["step"], r["loss"]) for r in rows] == [(1, 1.0), (2, 2.0), (3, 30.0)], workdir
    monkeypatch.setattr(jax, "process_index", lambda: 1)
    writer = MetricsWriter(tmp_path / "other", printer=None)
    assert writer.discard_after(0) == 0
    writer.close()
    assert not (tmp_path / "other").exists()


def test_a_dataset_in_a_bucket_opens_with_the_cheap_start_up_check(tmp_path):
    """gs:// datasets are read through epath; the start-up check there is index + presence only."""
    from stepvideo_jax.training import startup
    from tests.test_paths import fake_gcs

    local = write_tiny_dataset(tmp_path / "gcs" / "bucket" / "d")
    with fake_gcs(tmp_path / "gcs"):
        ds = data_format.Dataset("gs://bucket/d")
        assert str(ds.root) == "gs://bucket/d" and len(ds) == len(local)
        startup.check_dataset(ds, "gs://bucket/d")
        np.testing.assert_array_equal(ds.load(1)["mean"], local.load(1)["mean"])
        assert ds.negative()["y"].shape == local.negative()["y"].shape
        ds.check(arrays=True)                                       # verify reads through the URI too
        (tmp_path / "gcs" / "bucket" / "d" / local.records[1]["file"]).unlink()
        with pytest.raises(data_format.DatasetError, match=r"gs://bucket/d/samples/.* is missing"):
            startup.check_dataset(ds, "gs://bucket/d")
