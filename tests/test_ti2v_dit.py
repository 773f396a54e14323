"""Step-Video-TI2V DiT parity with the official `StepVideoModel(use_additional_conditions=True)`
(fixture `ti2v`), through the project's converter; the T2V path stays as it was."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from stepvideo_jax.convert import dit as dit_convert
from stepvideo_jax.convert.errors import CheckpointError
from stepvideo_jax.convert.safetensors_io import TensorSource
from stepvideo_jax.parallel.mesh import MeshConfig, make_mesh, shard_model
from tests.fixtures import assert_close, fixture_dir, load_json, load_npz

ATOL = RTOL = 1e-4
CONFIG = load_json("ti2v")
CASES = sorted(CONFIG["cases"])


@functools.lru_cache(maxsize=None)
def fixture_model():
    cfg = dit_convert.config_from_dict(CONFIG["constructor_args"])
    source = TensorSource.single(fixture_dir("ti2v") / "weights.safetensors")
    return dit_convert.convert(cfg, source, label="fixture ti2v")


@functools.lru_cache(maxsize=None)
def arrays():
    return load_npz("ti2v", "cases.npz")


def case_arrays(name):
    prefix = f"{name}."
    return {k[len(prefix):]: v for k, v in arrays().items() if k.startswith(prefix)}


def run(model, case, *, motion_score=None, capture=True, backend=None):
    graphdef, state = nnx.split(model)

    @jax.jit
    def fwd(state, x, t, y, y_mask, clip, cond, ms):
        m = nnx.merge(graphdef, state)
        return nnx.capture(m, nnx.Intermediate)(x, t, y, y_mask, clip, condition=cond, motion_score=ms,
                                                 backend=backend, capture=capture)

    ms = case["motion_score"] if motion_score is None else motion_score
    out, inter = fwd(state, case["hidden_states"], case["timestep"], case["encoder_hidden_states"],
                     case["encoder_attention_mask"], case["encoder_hidden_states_2"],
                     case["condition_hidden_states"], jnp.float32(ms))
    return np.asarray(out), nnx.to_pure_dict(inter)


def _get(inter, *path):
    node = inter
    for p in path:
        node = node[p]
    return np.asarray(node[0] if isinstance(node, tuple) else node)


def _block_out(inter, i):
    blocks = inter["blocks"]
    if isinstance(blocks, dict) and i in blocks:
        return _get(blocks, i, "out")
    return _get(blocks, "out")[i]  # stacked (scanned) blocks: leading layer axis


@pytest.fixture(scope="module", params=CASES)
def case_run(request):
    case = case_arrays(request.param)
    out, inter = run(fixture_model(), case)
    return request.param, case, out, inter


def test_config_detected_from_release_keys():
    assert fixture_model().cfg.ti2v
    kernel = fixture_model().patch_embed.kernel[...]
    assert kernel.shape[0] == CONFIG["patch_embed_in_channels"] * fixture_model().cfg.patch_size ** 2
    t2v = dit_convert.config_from_dict(dict(CONFIG["constructor_args"], use_additional_conditions=False))
    assert not t2v.ti2v
    with pytest.raises(CheckpointError, match="use_additional_conditions"):
        dit_convert.config_from_dict(dict(CONFIG["constructor_args"], use_additional_conditions="yes"))


def test_strict_keys():
    """TI2V weights into a T2V config (or the reverse) fail on the key/shape accounting."""
    source = TensorSource.single(fixture_dir("ti2v") / "weights.safetensors")
    t2v = dit_convert.config_from_dict(dict(CONFIG["constructor_args"], use_additional_conditions=False))
    with pytest.raises(CheckpointError, match="unexpected keys.*motion_score_embedder"):
        dit_convert.convert(t2v, source)
    dit_cfg = dit_convert.config_from_dict(dict(load_json("dit")["constructor_args"],
                                                use_additional_conditions=True))
    with pytest.raises(CheckpointError, match="missing keys.*motion_score_embedder"):
        dit_convert.convert(dit_cfg, TensorSource.single(fixture_dir("dit") / "weights.safetensors"))


def test_output(case_run):
    name, case, out, _ = case_run
    assert_close(out, case["output"], atol=ATOL, rtol=RTOL, name=f"{name}.output")


def test_intermediates(case_run):
    name, case, _, inter = case_run
    b, f, c, h, w = case["hidden_states"].shape
    cat = np.concatenate([case["hidden_states"], case["condition_hidden_states"]], axis=2)
    np.testing.assert_array_equal(cat.reshape(b * f, 2 * c, h, w), case["patch_embed_in"])
    np.testing.assert_array_equal(np.broadcast_to(case["motion_score"], (b,)), case["motion_score_in"])
    for key in ("timestep_proj", "timestep_emb", "motion_score_proj", "motion_score_emb",
                "embedded_timestep", "adaln_modulation", "blocks_in"):
        assert_close(_get(inter, key), case[key], atol=ATOL, rtol=RTOL, name=f"{name}.{key}")
    assert_close(_get(inter, "blocks_in").reshape(b * f, h * w, -1), case["patch_embed_out"],
                 atol=ATOL, rtol=RTOL, name=f"{name}.patch_embed_out")
    L = case["caption_tokens"].shape[1]
    assert_close(_get(inter, "caption_tokens_full")[:, :L], case["caption_tokens"], atol=ATOL, rtol=RTOL,
                 name=f"{name}.caption_tokens")
    key_mask = _get(inter, "key_mask")
    assert not key_mask[:, L:].any()
    s = case["cross_attn_mask"].shape[1]
    np.testing.assert_array_equal(np.broadcast_to(key_mask[:, None, :L], (b, s, L)).astype(np.int32),
                                  case["cross_attn_mask"])
    n_blocks = CONFIG["constructor_args"]["num_layers"]
    for i in range(n_blocks):
        assert_close(_block_out(inter, i), case[f"block{i}_out"], atol=ATOL, rtol=RTOL, name=f"{name}.block{i}_out")


def test_adaln_one_motion_score_per_row():
    rows = case_arrays("adaln_rows")
    model = fixture_model()
    (mod, emb), inter = nnx.capture(model.embed_timestep, nnx.Intermediate)(
        jnp.asarray(rows["timestep"]), jnp.asarray(rows["motion_score"]), capture=True)
    inter = nnx.to_pure_dict(inter)
    for key in ("timestep_proj", "timestep_emb", "motion_score_proj", "motion_score_emb",
                "embedded_timestep", "adaln_modulation"):
        assert_close(_get(inter, key), rows[key], atol=ATOL, rtol=RTOL, name=f"adaln_rows.{key}")
    assert_close(emb, rows["embedded_timestep"], atol=ATOL, rtol=RTOL)
    assert_close(np.asarray(mod).reshape(mod.shape[0], -1), rows["adaln_modulation"], atol=ATOL, rtol=RTOL)


@pytest.mark.slow
def test_motion_score_changes_the_output_and_the_final_layer():
    case = case_arrays(CASES[0])
    out, _ = run(fixture_model(), case, capture=False)
    other, _ = run(fixture_model(), case, motion_score=float(case["motion_score"]) + 1.0, capture=False)
    assert np.max(np.abs(other - out)) > 1e-2
    model = fixture_model()
    emb = model.embed_timestep(jnp.asarray(case["timestep"]), jnp.float32(case["motion_score"]))[1]
    emb2 = model.embed_timestep(jnp.asarray(case["timestep"]), jnp.float32(case["motion_score"] + 1))[1]
    hidden = jnp.asarray(case["blocks_in"])
    assert np.max(np.abs(np.asarray(model.final_layer(hidden, emb) - model.final_layer(hidden, emb2)))) > 1e-3


def test_release_transformer_loads_strictly():
    model = dit_convert.load(fixture_dir("ti2v") / "stepvideo-ti2v" / "transformer")
    assert model.cfg.ti2v
    n = sum(int(np.prod(v[...].shape)) for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param)))
    raw = load_json("ti2v", "stepvideo-ti2v/transformer/config.json")
    assert model.cfg.in_channels == raw["in_channels"]
    assert model.patch_embed.kernel[...].shape[0] == 2 * raw["in_channels"] * raw.get("patch_size", 1) ** 2
    assert n == sum(int(np.prod(s)) for s in _release_shapes().values())


def _release_shapes():
    import json

    from safetensors import safe_open

    tdir = fixture_dir("ti2v") / "stepvideo-ti2v" / "transformer"
    index = json.loads((tdir / dit_convert.INDEX).read_text())
    shapes = {}
    for shard in sorted(set(index["weight_map"].values())):
        with safe_open(str(tdir / shard), "np") as f:
            shapes.update({k: f.get_slice(k).get_shape() for k in f.keys()})
    return shapes


def test_inputs_checked():
    case = case_arrays(CASES[0])
    model = fixture_model()
    args = (case["hidden_states"], case["timestep"], case["encoder_hidden_states"],
            case["encoder_attention_mask"], case["encoder_hidden_states_2"])
    with pytest.raises(ValueError, match="condition latents"):
        model(*args, motion_score=1.0)
    with pytest.raises(ValueError, match="condition latents"):
        condition = case["condition_hidden_states"]
        model(*args, condition=np.concatenate([condition, condition[:, :1]], axis=1), motion_score=1.0)
    with pytest.raises(ValueError, match="motion_score"):
        model(*args, condition=case["condition_hidden_states"])


def test_t2v_model_rejects_ti2v_inputs():
    dit = load_json("dit")
    cfg = dit_convert.config_from_dict(dit["constructor_args"])
    assert not cfg.ti2v
    model = dit_convert.convert(cfg, TensorSource.single(fixture_dir("dit") / "weights.safetensors"))
    case = load_npz("dit", f"{dit['cases'][0]}.npz")
    args = (case["hidden_states"], case["timestep"], case["encoder_hidden_states"],
            case["encoder_attention_mask"], case["encoder_hidden_states_2"])
    with pytest.raises(ValueError, match="T2V"):
        model(*args, condition=case["hidden_states"])
    with pytest.raises(ValueError, match="T2V"):
        model(*args, motion_score=5.0)


@pytest.mark.sharding
@pytest.mark.slow
def test_sharded_equals_one_device():
    """(fsdp=2, sequence=2, tensor=2) with ring attention == one device, max|a-b|/max|b| <= 1e-5."""
    case = case_arrays(CASES[-1])
    ref, _ = run(fixture_model(), case, capture=False)
    mesh = make_mesh(MeshConfig.from_string("fsdp=2,sequence=2,tensor=2"))
    model = shard_model(nnx.clone(fixture_model()), mesh)
    assert len(model.motion_linear_2.kernel[...].addressable_shards) == mesh.size
    with jax.set_mesh(mesh):
        out, _ = run(model, case, capture=False, backend="ring")
    err = float(np.max(np.abs(out - ref)) / np.max(np.abs(ref)))
    print(f"\nti2v sharded rel err {err:.2e}")
    assert err <= 1e-5
