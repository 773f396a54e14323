"""The converter CLI on the tiny release directory: every stored tensor equals its transformed source,
restores land in the requested shardings, the output is replaced only with --overwrite."""
import json
import pathlib

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

from stepvideo_jax import checkpoints
from stepvideo_jax.convert import cli, conversion, dit, orbax_io, registry
from stepvideo_jax.convert.keymap import checkpoint_arrays
from stepvideo_jax.parallel.rules import state_shardings
from tests.fixtures import fixture_dir

OUT_DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16)}


def release(variant: str = "stepvideo-t2v") -> pathlib.Path:
    return fixture_dir("release_layout") / variant


def bits(x) -> np.ndarray:
    x = np.asarray(x)
    return x.view({2: np.uint16, 4: np.uint32}[x.dtype.itemsize])


def flat_params(model) -> dict[str, jax.Array]:
    """Checkpoint key (one per layer of the stacked blocks) -> array."""
    return dict(checkpoint_arrays(nnx.state(model)))


def state_params(model) -> dict[str, jax.Array]:
    """State path (the stacked blocks as one array each) -> array."""
    return {"/".join(map(str, p)): v.get_value() for p, v in nnx.to_flat_state(nnx.state(model))}


def expected_transformer(folder: pathlib.Path, dtype: np.dtype) -> dict[str, np.ndarray]:
    """Every official tensor through the key map's transform, cast to the stored dtype."""
    source = dit.tensor_source(folder)
    return {r.dst: r.transform(source.read(r.src)).astype(dtype) for r in dit.rules(dit.read_config(folder))}


def run(*args: str) -> int:
    return cli.main([str(a) for a in args])


@pytest.mark.parametrize("variant", ["stepvideo-t2v", "stepvideo-t2v-bf16"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_transformer_tensors_equal_their_source(tmp_path, variant, dtype):
    out = tmp_path / "out"
    assert run("--release", release(variant), "--out", out, "--components", "transformer", "--dtype", dtype) == 0
    manifest = orbax_io.read_manifest(out / "transformer")
    assert manifest["dtype"] == dtype and manifest["component"] == "transformer"
    assert (out / "transformer" / "config.json").read_bytes() == (
        release(variant) / "transformer" / "config.json").read_bytes()
    got = flat_params(checkpoints.load_converted(out, "transformer"))
    want = expected_transformer(release(variant) / "transformer", OUT_DTYPES[dtype])
    assert got.keys() == want.keys()
    assert manifest["num_params"] == sum(v.size for v in want.values())
    for k, w in want.items():
        g = np.asarray(got[k])
        assert g.dtype == w.dtype and g.shape == w.shape, k
        assert np.array_equal(bits(g), bits(w)), f"{k}: converted tensor differs from its source"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"], "temporary directories left behind"


def test_bf16_release_equals_rounded_f32_release(tmp_path):
    """Both fixture copies converted to bfloat16 agree bit for bit (the bf16 shards are RNE of f32)."""
    for variant in ("stepvideo-t2v", "stepvideo-t2v-bf16"):
        assert run("--release", release(variant), "--out", tmp_path / variant, "--components", "transformer",
                   "--dtype", "bfloat16") == 0
    a, b = (flat_params(checkpoints.load_converted(tmp_path / v, "transformer"))
            for v in ("stepvideo-t2v", "stepvideo-t2v-bf16"))
    for k in a:
        assert np.array_equal(bits(a[k]), bits(b[k])), k


def test_restore_casts_to_the_requested_dtype(tmp_path):
    """A float32 conversion restored with bfloat16 parameters equals the bfloat16 conversion."""
    for dtype in ("float32", "bfloat16"):
        assert run("--release", release(), "--out", tmp_path / dtype, "--components", "transformer",
                   "--dtype", dtype) == 0
    cast = flat_params(checkpoints.load_converted(tmp_path / "float32", "transformer", param_dtype=jnp.bfloat16))
    stored = flat_params(checkpoints.load_converted(tmp_path / "bfloat16", "transformer"))
    for k in stored:
        assert cast[k].dtype == jnp.bfloat16 and np.array_equal(bits(cast[k]), bits(stored[k])), k


@pytest.mark.sharding
def test_sharded_restore_on_8_devices(tmp_path):
    """Small groups (a quarter of the transformer's bytes) and a 4x2 (fsdp, tensor) mesh: every array
    arrives in the logical rules' sharding with the same values as an unsharded restore."""
    out = tmp_path / "out"
    index = json.loads((release() / "transformer" / "diffusion_pytorch_model.safetensors.index.json").read_text())
    budget = max(1, index["metadata"]["total_size"] // 4)
    conversion.convert_release(release(), out, components=["transformer"], dtype="float32", group_bytes=budget)
    manifest = orbax_io.read_manifest(out / "transformer")
    assert len(manifest["groups"]) > 1
    for g in manifest["groups"]:
        sizes = [4 * int(np.prod(s)) for s in g["params"].values()]
        assert sum(sizes) <= budget or len(sizes) == 1, f"group {g['dir']} exceeds the budget"

    devices = np.array(jax.devices())
    assert devices.size == 8, "tests/conftest.py provides 8 host devices"
    mesh = jax.sharding.Mesh(devices.reshape(4, 2), ("fsdp", "tensor"))
    plain = state_params(checkpoints.load_converted(out, "transformer"))
    sharded_model = checkpoints.load_converted(out, "transformer", mesh=mesh)
    sharded = state_params(sharded_model)
    want = {"/".join(map(str, p)): s for p, s in
            nnx.to_flat_state(state_shardings(nnx.state(sharded_model), mesh))}
    assert sharded.keys() == plain.keys() == want.keys()
    assert any(len(s.device_set) == 8 and not s.is_fully_replicated for s in want.values())
    for k, v in sharded.items():
        assert v.sharding.is_equivalent_to(want[k], v.ndim), f"{k}: {v.sharding} != {want[k]}"
        assert np.array_equal(np.asarray(v), np.asarray(plain[k])), k

    abstract = nnx.eval_shape(lambda: dit.build(dit.read_config(out / "transformer"), rngs=nnx.Rngs(0)))
    explicit = orbax_io.restore(out / "transformer", abstract,
                                shardings=state_shardings(nnx.state(abstract), mesh))
    for k, v in state_params(explicit).items():
        assert v.sharding.is_equivalent_to(want[k], v.ndim) and np.array_equal(np.asarray(v), plain[k]), k


def test_cli_stores_bfloat16_by_default(tmp_path):
    """The released shards are bfloat16: the default output keeps their size, not twice it."""
    assert run("--release", release(), "--out", tmp_path / "out", "--components", "transformer") == 0
    assert orbax_io.read_manifest(tmp_path / "out" / "transformer")["dtype"] == "bfloat16"


def test_existing_destination_needs_overwrite(tmp_path, capsys):
    out = tmp_path / "out"
    assert run("--release", release(), "--out", out, "--components", "transformer", "--dtype", "float32") == 0
    before = (out / "transformer" / orbax_io.MANIFEST).read_text()
    assert run("--release", release(), "--out", out, "--components", "transformer", "--dtype", "bfloat16") == 1
    err = capsys.readouterr().err
    assert "already exists" in err and "--overwrite" in err
    assert (out / "transformer" / orbax_io.MANIFEST).read_text() == before
    assert run("--release", release(), "--out", out, "--components", "transformer", "--dtype", "bfloat16",
               "--overwrite") == 0
    assert orbax_io.read_manifest(out / "transformer")["dtype"] == "bfloat16"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"], "temporary directories left behind"


def test_all_registered_components_round_trip(tmp_path):
    """Default: every registered component the release has; each restores to its in-memory conversion,
    and the files generation needs besides weights are copied."""
    root = release()
    out = tmp_path / "out"
    assert run("--release", root, "--out", out, "--dtype", "float32") == 0
    present = [c for c in registry.COMPONENTS if (root / c).is_dir()]
    summary = json.loads((out / registry.CONVERTED_MARKER).read_text())
    assert sorted(summary["components"]) == sorted(present)
    for name in present:
        for rel in registry.COMPONENTS[name].files:
            src, dst = root / name / rel, out / name / rel
            assert dst.exists() == src.exists(), f"{name}/{rel}"
            for f in ([src] if src.is_file() else [p for p in src.rglob("*") if p.is_file()]):
                assert (dst / f.relative_to(src) if src.is_dir() else dst).read_bytes() == f.read_bytes()
        got = flat_params(checkpoints.load_converted(out, name))
        want = flat_params(registry.converter(name).load(root / name))
        assert got.keys() == want.keys(), name
        for k in want:
            assert np.array_equal(bits(got[k]), bits(want[k])), f"{name}: {k}"
