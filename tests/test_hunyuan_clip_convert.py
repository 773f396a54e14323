"""Hunyuan-CLIP conversion: the release layout's torch pickle, a pickle with extra keys, strict
key/shape/config errors, and the release layout's end-to-end CLIP arrays."""
import json
import logging
import shutil

import jax
import numpy as np
import pytest
from flax import nnx

from stepvideo_jax.convert import hunyuan_clip as convert_clip
from stepvideo_jax.convert.errors import CheckpointError
from stepvideo_jax.convert.keymap import flat_shapes
from stepvideo_jax.convert.torch_pickle import TorchPickleFile
from stepvideo_jax.text.wordpiece_tokenizer import WordPieceTokenizer
from tests.fixtures import assert_close, fixture_dir, load_npz
from tests.test_torch_pickle import write_torch_zip

RELEASE = ("release_layout", "stepvideo-t2v", "hunyuan_clip")


def _release_dir():
    return fixture_dir(RELEASE[0]).joinpath(*RELEASE[1:])


def _flat_params(model) -> dict[str, np.ndarray]:
    flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
    return {"/".join(str(p) for p in path): np.asarray(v.get_value()) for path, v in flat}


def _tmp_component(tmp_path, tensors, config=None):
    """A `hunyuan_clip/` folder with the release config (or `config`) and `tensors` as a torch pickle."""
    enc = tmp_path / "clip_text_encoder"
    enc.mkdir(parents=True, exist_ok=True)
    if config is None:
        shutil.copy(_release_dir() / convert_clip.CONFIG_FILE, enc / "config.json")
    else:
        (enc / "config.json").write_text(json.dumps(config))
    write_torch_zip(enc / "pytorch_model.bin", tensors, archive="pytorch_model")
    return tmp_path


@pytest.fixture(scope="module")
def release_tensors():
    src = TorchPickleFile(_release_dir() / "clip_text_encoder" / "pytorch_model.bin")
    return {k: src.read(k) for k in src.keys()}


def test_release_layout_every_tensor_equals_its_source(release_tensors):
    """Every converted parameter is its official tensor (transposed for Linear kernels), bit for bit,
    and every parameter of the model is produced."""
    release = _release_dir()
    config = convert_clip.read_config(release)
    model = convert_clip.load(release)
    params = _flat_params(model)
    rules = convert_clip.rules(config)
    assert sorted(r.dst for r in rules) == sorted(params)
    assert sorted(r.src for r in rules) == sorted(release_tensors)
    for r in rules:
        want = r.transform(release_tensors[r.src])
        got = params[r.dst]
        assert got.dtype == want.dtype and np.array_equal(got, want), r.src


def test_extra_keys_are_ignored_with_a_logged_count(tmp_path, release_tensors, caplog):
    """A pickle with foreign tensors, a pooler and a `position_ids` buffer converts to the same model."""
    config = convert_clip.read_config(_release_dir())
    d = config.hidden_size
    extra = {
        "text_projection.weight": np.ones((8, d), np.float32),
        "visual.conv1.weight": np.zeros((4, 3, 2, 2), np.float16),
        "logit_scale": np.array(4.6, np.float32),
        "bert.pooler.dense.weight": np.ones((d, d), np.float32),
        "bert.pooler.dense.bias": np.zeros((d,), np.float32),
        "bert.embeddings.position_ids": np.arange(config.max_position_embeddings, dtype=np.int64)[None],
    }
    component = _tmp_component(tmp_path, {**extra, **release_tensors})
    assert sorted(convert_clip.ignored_keys(convert_clip.tensor_source(component))) == sorted(extra)
    with caplog.at_level(logging.INFO, logger=convert_clip.__name__):
        model = convert_clip.load(component)
    assert f"ignoring {len(extra)} tensors" in caplog.text
    reference = _flat_params(convert_clip.load(_release_dir()))
    params = _flat_params(model)
    assert sorted(params) == sorted(reference)
    for k in reference:
        np.testing.assert_array_equal(params[k], reference[k], err_msg=k)


def test_strict_key_and_shape_errors(tmp_path, release_tensors):
    name = "bert.encoder.layer.0.attention.self.query.weight"
    cases = {
        "missing": ({k: v for k, v in release_tensors.items() if k != name}, rf"missing keys \(1\): {name}"),
        "unexpected": ({**release_tensors, "bert.encoder.layer.0.attention.self.rotary.weight":
                        np.ones(2, np.float32)},
                       r"unexpected keys \(1\): bert.encoder.layer.0.attention.self.rotary.weight"),
        "extra_layer": ({**release_tensors, "bert.encoder.layer.99.output.dense.bias": np.ones(2, np.float32)},
                        "unexpected keys"),
        "shape": ({**release_tensors, name: release_tensors[name][:-1]}, f"{name!r} has shape"),
    }
    for label, (tensors, message) in cases.items():
        component = _tmp_component(tmp_path / label, tensors)
        with pytest.raises(CheckpointError, match=message):
            convert_clip.load(component)


def test_config_errors_and_tolerance(tmp_path):
    raw = json.loads((_release_dir() / convert_clip.CONFIG_FILE).read_text())
    with pytest.warns(UserWarning, match="unknown BertConfig keys.*'shiny_new_option'"):
        cfg = convert_clip.config_from_dict({**raw, "shiny_new_option": 1})
    assert cfg == convert_clip.config_from_dict(raw)
    assert (cfg.hidden_size, cfg.num_layers, cfg.vocab_size) == (raw["hidden_size"], raw["num_hidden_layers"],
                                                                 raw["vocab_size"])
    with pytest.raises(CheckpointError, match=r"missing required BertConfig keys \['num_hidden_layers'\]"):
        convert_clip.config_from_dict({k: v for k, v in raw.items() if k != "num_hidden_layers"})
    with pytest.raises(CheckpointError, match="hidden_act = 'relu' is not supported; valid: 'gelu'"):
        convert_clip.config_from_dict({**raw, "hidden_act": "relu"})
    with pytest.raises(CheckpointError, match="position_embedding_type"):
        convert_clip.config_from_dict({**raw, "position_embedding_type": "relative_key"})
    with pytest.raises(CheckpointError, match="config not found"):
        convert_clip.read_config(tmp_path)
    (tmp_path / "clip_text_encoder").mkdir()
    shutil.copy(_release_dir() / convert_clip.CONFIG_FILE, tmp_path / convert_clip.CONFIG_FILE)
    with pytest.raises(CheckpointError, match="no weights found"):
        convert_clip.tensor_source(tmp_path)


def test_safetensors_copy_converts_the_same(tmp_path):
    """`clip_text_encoder/model.safetensors` (the fixture's `weights.safetensors`) is accepted too."""
    (tmp_path / "clip_text_encoder").mkdir()
    shutil.copy(_release_dir() / convert_clip.CONFIG_FILE, tmp_path / convert_clip.CONFIG_FILE)
    shutil.copy(fixture_dir("hunyuan_clip") / "weights.safetensors",
                tmp_path / "clip_text_encoder" / "model.safetensors")
    a, b = _flat_params(convert_clip.load(tmp_path)), _flat_params(convert_clip.load(_release_dir()))
    assert sorted(a) == sorted(b) and all(np.array_equal(a[k], b[k]) for k in a)


def test_release_layout_end_to_end_clip_arrays():
    """Tokenize `caption_prompts` with the release's tokenizer folder, encode with the converted
    release weights: ids and masks exact, `clip_embedding` within the README's text tolerance."""
    release = _release_dir()
    e2e = load_npz(RELEASE[0], "e2e_cases.npz")
    tok = WordPieceTokenizer.from_dir(release / convert_clip.TOKENIZER_DIR)
    model = convert_clip.load(release)
    graphdef, state = nnx.split(model)
    encode = jax.jit(lambda s, ids, mask: nnx.merge(graphdef, s)(ids, mask))
    cases = sorted({k.split(".")[0] for k in e2e if k.endswith(".clip_input_ids")})
    assert cases
    for case in cases:
        prompts = [str(p) for p in e2e[f"{case}.caption_prompts"]]
        batch = tok(prompts, max_length=e2e[f"{case}.clip_input_ids"].shape[1])
        np.testing.assert_array_equal(batch.input_ids, e2e[f"{case}.clip_input_ids"], err_msg=case)
        np.testing.assert_array_equal(batch.attention_mask, e2e[f"{case}.clip_attention_mask"], err_msg=case)
        err = assert_close(encode(state, batch.input_ids, batch.attention_mask), e2e[f"{case}.clip_embedding"],
                           atol=5e-5, rtol=1e-4, name=f"{case}.clip_embedding")
        print(f"{case}.clip_embedding max abs err {err:.2e}")


def test_converter_interface():
    """The small interface the conversion CLI registers."""
    config = convert_clip.read_config(_release_dir())
    model = nnx.eval_shape(lambda: convert_clip.build(config, rngs=nnx.Rngs(0)))
    shapes = flat_shapes(nnx.state(model))
    assert {r.dst for r in convert_clip.rules(config)} == set(shapes)
    assert all(isinstance(p, str) for p in convert_clip.IGNORE)
