"""Workdirs, checkpoints and outputs as `etils.epath` URIs, and process 0 as the only writer of
shared files (`stepvideo_jax/paths.py`).

No bucket is reachable here, so `fake_gcs` serves `gs://` from a local folder: it swaps epath's
backends for one that maps `gs://<bucket>/<key>` to `<root>/<bucket>/<key>`; every other layer
(our path helpers, the writers) runs unchanged, so a path helper that rewrote the URI (as
`pathlib.Path("gs://b/x")` -> `gs:/b/x` does) would write elsewhere and fail the test.
"""
import contextlib
import json
import os
import pathlib

import jax
import numpy as np
import pytest
from etils import epath
from etils.epath import gpath
from etils.epath import testing as epath_testing

import stepvideo_jax
from stepvideo_jax import checkpoints, hub, paths
from stepvideo_jax.convert import orbax_io
from stepvideo_jax.sampling import eval_set, generation
from stepvideo_jax.sampling import video_io
from stepvideo_jax.training.checkpoint import Checkpointer
from stepvideo_jax.training.metrics import MetricsWriter, read_jsonl
from tests.test_generate_cli import load_config
from tests.test_pipeline import SIZE as TOY_SIZE
from tests.test_pipeline import toy_pipeline  # noqa: F401  (a fixture)

URIS = ["gs://bucket/runs/ft", "gs://bucket/out/video.mp4", "s3://b/x/y.npy"]


@contextlib.contextmanager
def fake_gcs(root: pathlib.Path):
    def local(p):
        p = os.fspath(p)
        return str(root / p[len("gs://"):]) if p.startswith("gs://") else p

    def mapped(original, path, *args, **kw):
        return original(local(path), *[local(a) if isinstance(a, (str, os.PathLike)) else a for a in args], **kw)

    names = ("copy", "exists", "glob", "isdir", "listdir", "makedirs", "mkdir", "open", "remove", "rename",
             "replace", "rmtree", "stat", "walk")
    original_tf = gpath._is_tf_installed
    gpath._is_tf_installed = lambda: False     # else gs:// goes to TensorFlow's real GCS client
    try:
        with epath_testing.mock_epath(**{n: mapped for n in names}):
            yield
    finally:
        gpath._is_tf_installed = original_tf


@pytest.mark.parametrize("uri", URIS)
def test_uris_survive_every_path_helper(uri):
    assert str(paths.as_path(uri)) == uri
    assert str(paths.absolute(uri)) == uri
    assert str(paths.as_path(paths.as_path(uri))) == uri
    assert str(paths.as_path(uri).parent / paths.as_path(uri).name) == uri
    assert hub.resolve(uri) == uri           # a URI is never taken for a Hugging Face repo id
    if uri.endswith(".mp4"):
        assert str(video_io.check_writable(uri)) == uri


def test_local_paths_become_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert str(paths.absolute("run")) == str(tmp_path / "run")
    assert str(paths.as_path("~/x")) == os.path.expanduser("~/x")


def test_job_outputs_keep_a_uri():
    config = load_config()
    config.output = "gs://bucket/videos/clip.mp4"
    assert [str(p) for p in generation.resolve(config).outputs] == ["gs://bucket/videos/clip.mp4"]
    config.prompts = ("a", "b")
    assert [str(p) for p in generation.resolve(config).outputs] == [
        "gs://bucket/videos/clip_0.mp4", "gs://bucket/videos/clip_1.mp4"]


def test_checkpointer_directory_keeps_a_uri(monkeypatch):
    """The Orbax manager gets the URI itself (Orbax and tensorstore speak gs:// natively)."""
    seen = {}

    class Manager:
        def __init__(self, directory, **kw):
            seen["directory"] = directory

    monkeypatch.setattr("orbax.checkpoint.CheckpointManager", Manager)
    Checkpointer("gs://bucket/runs/ft/checkpoints", save_every=1)
    assert str(seen["directory"]) == "gs://bucket/runs/ft/checkpoints"


def test_outputs_metrics_and_manifests_reach_a_bucket(tmp_path, toy_pipeline):
    """mp4s, `.npy` latents, the eval manifest and metrics.jsonl written to gs:// URIs land under
    the fake bucket with their names, and read back through the same URIs."""
    config = load_config()
    config.update(dict(num_frames=TOY_SIZE.num_frames, height=TOY_SIZE.height, width=TOY_SIZE.width, num_steps=2,
                       progress=False, save_latents=True))
    bucket = tmp_path / "gcs"
    with fake_gcs(bucket):
        manifest = eval_set.run_eval(config, ["a cat", "a dog"], "gs://bucket/eval", pipe=toy_pipeline)
        assert sorted(manifest["videos"]) == ["000.mp4", "001.mp4"]
        again = eval_set.plan_eval(config, ["a cat", "a dog"], "gs://bucket/eval")
        assert again.todo == [] and str(again.output_dir) == "gs://bucket/eval"

        writer = MetricsWriter("gs://bucket/runs/ft", printer=None)
        writer.write(1, {"loss": 0.5})
        writer.write(2, {"loss": 0.25})
        writer.close()
        assert [r["loss"] for r in read_jsonl("gs://bucket/runs/ft/metrics.jsonl")] == [0.5, 0.25]
        assert epath.Path("gs://bucket/eval/000.npy").exists()
        assert not checkpoints.is_converted("gs://bucket/ckpt")
        (bucket / "bucket" / "ckpt" / "transformer").mkdir(parents=True)
        shipped = pathlib.Path(stepvideo_jax.__file__).parent / "assets" / "demo"
        (bucket / "bucket" / "ckpt" / "conversion.json").write_bytes((shipped / "conversion.json").read_bytes())
        (bucket / "bucket" / "ckpt" / "transformer" / "manifest.json").write_bytes(
            (shipped / "transformer" / "manifest.json").read_bytes())
        assert checkpoints.source_kind("gs://bucket/ckpt") == "converted"
        source = checkpoints.dit_source("gs://bucket/ckpt")
        assert (source.kind, str(source.path)) == ("converted", "gs://bucket/ckpt")
        assert checkpoints.dit_config("gs://bucket/ckpt") == checkpoints.dit_config(shipped)
        assert orbax_io.read_manifest("gs://bucket/ckpt/transformer") == json.loads(
            (shipped / "transformer" / "manifest.json").read_text())
    files = sorted(str(p.relative_to(bucket)) for p in bucket.rglob("*") if p.is_file())
    assert files == [
        "bucket/ckpt/conversion.json", "bucket/ckpt/transformer/manifest.json", "bucket/eval/000.mp4", "bucket/eval/000.npy", "bucket/eval/001.mp4",
        "bucket/eval/001.npy", "bucket/eval/manifest.json", "bucket/runs/ft/metrics.jsonl"]
    frames, _ = video_io.read_mp4(bucket / "bucket" / "eval" / "000.mp4")
    assert frames.shape == (TOY_SIZE.num_frames, TOY_SIZE.height, TOY_SIZE.width, 3)
    assert json.loads((bucket / "bucket" / "eval" / "manifest.json").read_text())["videos"]["001.mp4"]["prompt"] == (
        "a dog")
    assert not (tmp_path / "gs:").exists() and not pathlib.Path("gs:").exists()


def test_only_process_0_writes_shared_files(tmp_path, toy_pipeline, monkeypatch):
    """On process 1 of a pod every step runs but no shared file is written: no mp4, latents,
    manifest or metrics (process 0 writes them)."""
    config = load_config()
    config.update(dict(num_frames=TOY_SIZE.num_frames, height=TOY_SIZE.height, width=TOY_SIZE.width, num_steps=2,
                       progress=False, save_latents=True))
    monkeypatch.setattr(jax, "process_index", lambda: 1)
    calls = []
    original = toy_pipeline.__call__

    class Counting:
        def __getattr__(self, name):
            return getattr(toy_pipeline, name)

        def __call__(self, prompts, **kw):
            calls.append(list(prompts))
            return original(prompts, **kw)

    manifest = eval_set.run_eval(config, ["a cat"], tmp_path / "eval", pipe=Counting())
    assert calls == [["a cat"]] and "000.mp4" in manifest["videos"]
    writer = MetricsWriter(tmp_path / "run", printer=None)
    writer.write(1, {"loss": 1.0})
    writer.close()
    assert list((tmp_path / "eval").iterdir()) == [] and not (tmp_path / "run").exists()   # (the folder: every process)

    monkeypatch.setattr(jax, "process_index", lambda: 0)
    eval_set.run_eval(config, ["a cat"], tmp_path / "eval", pipe=toy_pipeline)
    assert sorted(os.listdir(tmp_path / "eval")) == ["000.mp4", "000.npy", "manifest.json"]
