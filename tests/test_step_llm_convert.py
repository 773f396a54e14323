"""Step-LLM conversion of the release layout (sharded safetensors + index, float32 and bfloat16)."""
import json
import logging
import shutil

import ml_dtypes
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from stepvideo_jax.convert import step_llm as llm_convert
from stepvideo_jax.convert.errors import CheckpointError
from stepvideo_jax.convert.keymap import convert_tensors, flat_shapes
from tests.fixtures import assert_close, fixture_dir, load_npz

RELEASES = {"f32": "stepvideo-t2v", "bf16": "stepvideo-t2v-bf16"}


def release_dir(which):
    return fixture_dir("release_layout") / RELEASES[which] / "step_llm"


def official_tensors(component_dir):
    """Every tensor of the shards named by the index, read with the `safetensors` library."""
    index = json.loads((component_dir / llm_convert.INDEX).read_text())
    out = {}
    for name in sorted(set(index["weight_map"].values())):
        out.update(load_file(component_dir / name))
    assert set(out) == set(index["weight_map"])
    return out


def converted(component_dir, dtype=None):
    cfg = llm_convert.read_config(component_dir)
    abstract = nnx.eval_shape(lambda: llm_convert.build(cfg, rngs=nnx.Rngs(0)))
    flat = dict(convert_tensors(llm_convert.tensor_source(component_dir), llm_convert.rules(cfg),
                                flat_shapes(nnx.state(abstract)), dtype=dtype))
    return cfg, flat


@pytest.mark.parametrize("which", sorted(RELEASES))
def test_every_converted_tensor_equals_its_source(which):
    """Re-fuse our tensors into the official layout and compare bit for bit with the shards."""
    d = release_dir(which)
    src = official_tensors(d)
    cfg, ours = converted(d)
    assert {a.dtype for a in ours.values()} == {a.dtype for a in src.values()}  # no silent cast
    rebuilt = {"tok_embeddings.word_embeddings.weight": ours["embed"]}
    hd, g = cfg.head_dim, cfg.num_kv_groups
    for i in range(cfg.num_layers):
        p, o = f"transformer.layers.{i}.", f"layers/{i}/"
        k, v = (ours[o + f"attention/{n}/kernel"].T.reshape(g, 1, hd, -1) for n in ("wk", "wv"))
        kv = np.concatenate([k, v], axis=1).reshape(2 * g * hd, -1)
        rebuilt[p + "attention.wqkv.weight"] = np.concatenate([ours[o + "attention/wq/kernel"].T, kv])
        rebuilt[p + "attention.wo.weight"] = ours[o + "attention/wo/kernel"].T
        rebuilt[p + "feed_forward.w1.weight"] = np.concatenate(
            [ours[o + "feed_forward/gate/kernel"].T, ours[o + "feed_forward/up/kernel"].T])
        rebuilt[p + "feed_forward.w2.weight"] = ours[o + "feed_forward/down/kernel"].T
        rebuilt[p + "attention_norm.weight"] = ours[o + "attention_norm/weight"]
        rebuilt[p + "ffn_norm.weight"] = ours[o + "ffn_norm/weight"]
    assert set(rebuilt) == set(src)
    for key, want in src.items():
        assert rebuilt[key].shape == want.shape, key
        np.testing.assert_array_equal(rebuilt[key].view(np.uint16 if want.itemsize == 2 else np.uint32),
                                      want.view(np.uint16 if want.itemsize == 2 else np.uint32), err_msg=key)


def test_bf16_release_is_the_same_model():
    """The Step-LLM weights are bf16 values: both release copies convert to identical float32 arrays."""
    _, f32 = converted(release_dir("f32"), dtype=np.float32)
    _, bf16 = converted(release_dir("bf16"), dtype=np.float32)
    for key in f32:
        np.testing.assert_array_equal(bf16[key], f32[key], err_msg=key)


@pytest.mark.parametrize("which", sorted(RELEASES))
def test_loaded_release_reproduces_fixture(which):
    c = load_npz("step_llm", "cases.npz")
    model = llm_convert.load(release_dir(which))
    y = np.asarray(model(c["a_input_ids"]))
    assert_close(y, c["a_y"], atol=5e-5, rtol=1e-4, name=f"{which} a_y")


def test_bf16_param_dtype():
    model = llm_convert.load(release_dir("bf16"), dtype=np.dtype(ml_dtypes.bfloat16))
    kernel = model.layers.attention.wq.kernel[0]
    assert kernel.dtype == ml_dtypes.bfloat16


# ---- strict errors ---------------------------------------------------------------------------


@pytest.fixture
def single_file_copy(tmp_path):
    """A writable `step_llm/` with one `model.safetensors` holding the fixture's tensors."""
    d = tmp_path / "step_llm"
    d.mkdir()
    shutil.copy(release_dir("f32") / "config.json", d / "config.json")
    tensors = official_tensors(release_dir("f32"))
    save_file(tensors, d / llm_convert.SINGLE)
    return d, tensors


def test_missing_key_is_named(single_file_copy):
    d, tensors = single_file_copy
    key = "transformer.layers.0.ffn_norm.weight"
    save_file({k: v for k, v in tensors.items() if k != key}, d / llm_convert.SINGLE)
    with pytest.raises(CheckpointError, match=f"missing keys.*{key}"):
        llm_convert.load(d)


def test_unexpected_key_is_named(single_file_copy):
    d, tensors = single_file_copy
    save_file({**tensors, "transformer.final_norm.weight": np.ones(3, np.float32)}, d / llm_convert.SINGLE)
    with pytest.raises(CheckpointError, match="unexpected keys.*transformer.final_norm.weight"):
        llm_convert.load(d)


def test_wrong_shape_is_named(single_file_copy):
    d, tensors = single_file_copy
    key = "transformer.layers.1.attention.wqkv.weight"
    save_file({**tensors, key: tensors[key][:-1]}, d / llm_convert.SINGLE)
    with pytest.raises(CheckpointError, match="wqkv.weight.*shape"):
        llm_convert.load(d)
    key = "transformer.layers.0.attention.wo.weight"
    save_file({**tensors, key: tensors[key][:, :-1]}, d / llm_convert.SINGLE)
    with pytest.raises(CheckpointError, match="attention.wo.weight.*the model expects"):
        llm_convert.load(d)


def test_truncated_shard_and_broken_index(tmp_path):
    d = tmp_path / "step_llm"
    shutil.copytree(release_dir("f32"), d)
    for p in d.iterdir():
        p.chmod(0o644)
    shard = sorted(d.glob("model-*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="truncated"):
        llm_convert.load(d)
    (d / llm_convert.INDEX).write_text("{not json")
    with pytest.raises(CheckpointError, match="broken index"):
        llm_convert.load(d)
    (d / llm_convert.INDEX).unlink()
    with pytest.raises(CheckpointError, match="neither"):
        llm_convert.load(d)


def test_config_parsing(caplog):
    raw = json.loads((release_dir("f32") / "config.json").read_text())
    with caplog.at_level(logging.WARNING):
        cfg = llm_convert.config_from_dict({**raw, "rope_theta": 1e4})
    assert "rope_theta" in caplog.text
    assert cfg == llm_convert.read_config(release_dir("f32"))
    with pytest.raises(CheckpointError, match=r"missing required keys \['num_attention_groups'\]"):
        llm_convert.config_from_dict({k: v for k, v in raw.items() if k != "num_attention_groups"})
    with pytest.raises(CheckpointError, match="fp32_residual_connection"):
        llm_convert.config_from_dict({**raw, "fp32_residual_connection": True})
    with pytest.raises(CheckpointError, match="not a multiple"):
        llm_convert.config_from_dict({**raw, "num_attention_groups": raw["num_attention_heads"] + 1})
