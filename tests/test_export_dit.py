"""convert -> export reproduces the release's transformer tensors exactly (fixture release_layout)."""
import json
import subprocess
import sys

import numpy as np
import pytest

from stepvideo_jax import export
from stepvideo_jax.convert import dit as dit_convert
from stepvideo_jax.convert import export_dit
from stepvideo_jax.convert.errors import CheckpointError
from stepvideo_jax.convert.keymap import Rule
from tests.fixtures import PROJECT_ROOT, fixture_dir


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_convert_export_roundtrip_is_exact(tmp_path, dtype):
    src_dir = fixture_dir("release_layout") / ("stepvideo-t2v" if dtype == "float32" else "stepvideo-t2v-bf16")
    src_dir = src_dir / "transformer"
    model = dit_convert.load(src_dir)
    shard_bytes = max(1, json.loads((src_dir / dit_convert.INDEX).read_text())["metadata"]["total_size"] // 4)
    out = export_dit.export(model, tmp_path / "transformer", dtype=dtype, max_shard_bytes=shard_bytes)
    original, exported = dit_convert.tensor_source(src_dir), dit_convert.tensor_source(out)
    assert sorted(exported.keys()) == sorted(original.keys())
    for key in original.keys():
        a, b = exported.read(key), original.read(key)
        assert a.dtype == b.dtype and a.shape == b.shape, key
        np.testing.assert_array_equal(a.view(np.uint16 if a.itemsize == 2 else np.uint32),
                                      b.view(np.uint16 if b.itemsize == 2 else np.uint32), err_msg=key)
    index = json.loads((out / dit_convert.INDEX).read_text())
    assert len(set(index["weight_map"].values())) > 1  # sharded at a quarter of the total
    assert index["metadata"]["total_size"] == sum(exported.read(k).nbytes for k in exported.keys())
    assert dit_convert.read_config(out) == dit_convert.read_config(src_dir)
    assert json.loads((out / "config.json").read_text()).keys() == json.loads((src_dir / "config.json").read_text()).keys()


def test_non_permutation_transform_is_refused(monkeypatch):
    cfg = dit_convert.read_config(fixture_dir("release_layout") / "stepvideo-t2v" / "transformer")
    params = {"scale_shift_table": np.zeros((2, cfg.dim))}
    for bad in (lambda w: w * 2, lambda w: w.astype(np.float32) / 3, lambda w: np.zeros_like(w)):
        monkeypatch.setattr(dit_convert, "rules", lambda c, bad=bad: [Rule("scale_shift_table", "scale_shift_table", bad)])
        with pytest.raises(CheckpointError, match="permutation|cannot invert"):
            list(export_dit.official_tensors(cfg, params))


def test_config_the_release_cannot_express_is_refused(tmp_path):
    import dataclasses

    model = dit_convert.load(fixture_dir("release_layout") / "stepvideo-t2v" / "transformer")
    model.cfg = dataclasses.replace(model.cfg, rope_theta=500.0)
    with pytest.raises(CheckpointError, match="rope_theta"):
        export_dit.export(model, tmp_path / "t")


def test_command_line_reexports_a_transformer_and_names_a_bad_source(tmp_path, capsys):
    """`python -m stepvideo_jax.export`: a release `transformer/` re-exported bit for bit; a folder
    that is no DiT source is one error line, exit 1, and no output folder."""
    source = fixture_dir("release_layout") / "stepvideo-t2v" / "transformer"
    out = tmp_path / "transformer"
    assert export.main(["--transformer", str(source), "--out", str(out), "--dtype", "float32"]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    ours, theirs = dit_convert.tensor_source(out), dit_convert.tensor_source(source)
    assert sorted(ours.keys()) == sorted(theirs.keys())
    for key in theirs.keys():
        np.testing.assert_array_equal(ours.read(key), theirs.read(key), err_msg=key)

    empty = tmp_path / "empty"
    empty.mkdir()
    assert export.main(["--transformer", str(empty), "--out", str(tmp_path / "bad")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(empty) in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "bad").exists()


def test_the_old_command_names_the_new_one(tmp_path):
    """`python -m stepvideo_jax.convert.export_dit` (the command before it moved) exits 1 naming
    `python -m stepvideo_jax.export`, and writes nothing."""
    done = subprocess.run([sys.executable, "-m", "stepvideo_jax.convert.export_dit", "--workdir", str(tmp_path),
                           "--out", str(tmp_path / "out")], capture_output=True, text=True, cwd=PROJECT_ROOT)
    assert done.returncode == 1 and "python -m stepvideo_jax.export" in done.stderr
    assert not (tmp_path / "out").exists()
