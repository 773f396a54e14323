"""Hunyuan-CLIP converter: the released `hunyuan_clip/` folder -> `HunyuanClip` parameters.

Release layout: `hunyuan_clip/clip_text_encoder/config.json` (a `BertConfig`) and
`hunyuan_clip/clip_text_encoder/pytorch_model.bin` (a torch pickle; read without torch by
`torch_pickle.py`), `hunyuan_clip/tokenizer/` (WordPiece files). The BERT weights carry a `bert.`
prefix; the file has no pooler, and the released one also holds tensors outside the text tower:
everything that is not `bert.*` (and a pooler or `position_ids` buffer, if present) is ignored.
"""
from __future__ import annotations

import dataclasses
import logging
import pathlib
import re
import warnings
from typing import Any, Mapping

import jax.numpy as jnp
from flax import nnx

from stepvideo_jax.convert import release_paths
from stepvideo_jax.convert.errors import CheckpointError
from stepvideo_jax.convert.keymap import Rule, convert_model, expand, transpose
from stepvideo_jax.convert.safetensors_io import TensorSource
from stepvideo_jax.convert.torch_pickle import TorchPickleFile
from stepvideo_jax.models.hunyuan_clip import HunyuanClip, HunyuanClipConfig

log = logging.getLogger(__name__)

CONFIG_FILE = "clip_text_encoder/config.json"
WEIGHT_FILES = ("clip_text_encoder/pytorch_model.bin", "clip_text_encoder/model.safetensors")
TOKENIZER_DIR = "tokenizer"

# BertConfig key -> HunyuanClipConfig field
_CONFIG_KEYS = {
    "vocab_size": "vocab_size",
    "hidden_size": "hidden_size",
    "num_hidden_layers": "num_layers",
    "num_attention_heads": "num_heads",
    "intermediate_size": "intermediate_size",
    "max_position_embeddings": "max_position_embeddings",
    "type_vocab_size": "type_vocab_size",
    "layer_norm_eps": "layer_norm_eps",
}
# Settings the forward pass depends on, with the only value implemented.
_FIXED = {"hidden_act": "gelu", "position_embedding_type": "absolute"}
# Released keys that do not change the encoder's output (dropout is inactive at inference; the pooler
# entries describe the absent pooler; the rest is bookkeeping).
_KNOWN = {
    "_name_or_path", "architectures", "attention_probs_dropout_prob", "bos_token_id", "classifier_dropout",
    "directionality", "eos_token_id", "hidden_dropout_prob", "initializer_range", "model_type",
    "output_past", "pad_token_id", "pooler_fc_size", "pooler_num_attention_heads", "pooler_num_fc_layers",
    "pooler_size_per_head", "pooler_type", "torch_dtype", "transformers_version", "use_cache",
    "gradient_checkpointing", "is_decoder", "add_cross_attention", "chunk_size_feed_forward",
}

IGNORE = (
    r"(?!bert\.).*",                   # tensors outside the BERT text tower
    r"bert\.pooler\..*",               # pooler (absent from the release; unused by the pipeline)
    r"bert\.embeddings\.position_ids",  # buffer saved by older transformers versions
)

_RULES = (
    Rule("bert.embeddings.word_embeddings.weight", "embeddings/word_embeddings"),
    Rule("bert.embeddings.position_embeddings.weight", "embeddings/position_embeddings"),
    Rule("bert.embeddings.token_type_embeddings.weight", "embeddings/token_type_embeddings"),
    Rule("bert.embeddings.LayerNorm.weight", "embeddings/layer_norm/weight"),
    Rule("bert.embeddings.LayerNorm.bias", "embeddings/layer_norm/bias"),
    *(Rule(f"bert.encoder.layer.{{i}}.attention.self.{n}.weight", f"layers/{{i}}/attention/{n}/kernel",
           transpose) for n in ("query", "key", "value")),
    *(Rule(f"bert.encoder.layer.{{i}}.attention.self.{n}.bias", f"layers/{{i}}/attention/{n}/bias")
      for n in ("query", "key", "value")),
    Rule("bert.encoder.layer.{i}.attention.output.dense.weight", "layers/{i}/attention/out/kernel", transpose),
    Rule("bert.encoder.layer.{i}.attention.output.dense.bias", "layers/{i}/attention/out/bias"),
    Rule("bert.encoder.layer.{i}.attention.output.LayerNorm.weight", "layers/{i}/attention_norm/weight"),
    Rule("bert.encoder.layer.{i}.attention.output.LayerNorm.bias", "layers/{i}/attention_norm/bias"),
    Rule("bert.encoder.layer.{i}.intermediate.dense.weight", "layers/{i}/intermediate/kernel", transpose),
    Rule("bert.encoder.layer.{i}.intermediate.dense.bias", "layers/{i}/intermediate/bias"),
    Rule("bert.encoder.layer.{i}.output.dense.weight", "layers/{i}/output/kernel", transpose),
    Rule("bert.encoder.layer.{i}.output.dense.bias", "layers/{i}/output/bias"),
    Rule("bert.encoder.layer.{i}.output.LayerNorm.weight", "layers/{i}/output_norm/weight"),
    Rule("bert.encoder.layer.{i}.output.LayerNorm.bias", "layers/{i}/output_norm/bias"),
)


def config_from_dict(raw: Mapping[str, Any], *, label: str = "config") -> HunyuanClipConfig:
    """`HunyuanClipConfig` from a `BertConfig` dict: unknown keys warn, missing required keys raise."""
    missing = sorted(k for k in _CONFIG_KEYS if k not in raw and k != "layer_norm_eps")
    if missing:
        raise CheckpointError(f"{label}: missing required BertConfig keys {missing}")
    for key, want in _FIXED.items():
        if raw.get(key, want) != want:
            raise CheckpointError(f"{label}: {key} = {raw[key]!r} is not supported; valid: {want!r}")
    unknown = sorted(set(raw) - set(_CONFIG_KEYS) - set(_FIXED) - _KNOWN)
    if unknown:
        warnings.warn(f"{label}: ignoring unknown BertConfig keys {unknown}")
    default_eps = dataclasses.fields(HunyuanClipConfig)[-1].default
    kwargs = {field: raw.get(key, default_eps) if key == "layer_norm_eps" else raw[key]
              for key, field in _CONFIG_KEYS.items()}
    try:
        return HunyuanClipConfig(**{k: (float(v) if k == "layer_norm_eps" else int(v))
                                    for k, v in kwargs.items()})
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{label}: invalid BertConfig ({e})") from None


def read_config(component_dir, root=None) -> HunyuanClipConfig:
    """The encoder config of a release `hunyuan_clip/` folder (`clip_text_encoder/config.json`);
    `root`: see `release_paths`."""
    raw = release_paths.read_json(component_dir, CONFIG_FILE, root, expected=f"hunyuan_clip/{CONFIG_FILE}")
    return config_from_dict(raw, label=str(pathlib.Path(component_dir) / CONFIG_FILE))


def tensor_source(component_dir, root=None):
    """The weights: `clip_text_encoder/pytorch_model.bin` (torch pickle) or, failing that,
    `clip_text_encoder/model.safetensors`, inside `root` (see `release_paths`)."""
    component_dir = pathlib.Path(component_dir)
    for name in WEIGHT_FILES:
        path = component_dir / name
        if path.is_file():
            release_paths.release_file(component_dir, name, root)
            return TorchPickleFile(path) if path.suffix == ".bin" else TensorSource.single(path)
    raise CheckpointError(f"{component_dir}: no weights found; expected one of {list(WEIGHT_FILES)}")


def rules(config: HunyuanClipConfig) -> list[Rule]:
    """Official key -> our state path for every parameter (Linear weights transposed to (in, out))."""
    return expand(_RULES, config.num_layers)


def ignored_keys(source) -> list[str]:
    """Keys of `source` that `IGNORE` drops on purpose."""
    patterns = [re.compile(p) for p in IGNORE]
    return [k for k in source.keys() if any(p.fullmatch(k) for p in patterns)]


def build(config: HunyuanClipConfig, *, dtype=jnp.float32, param_dtype=jnp.float32,
          rngs: nnx.Rngs, attention_backend=None) -> HunyuanClip:
    return HunyuanClip(config, dtype=dtype, param_dtype=param_dtype, attention_backend=attention_backend,
                       rngs=rngs)


def load(component_dir, *, dtype=jnp.float32, param_dtype=None, attention_backend=None) -> HunyuanClip:
    """Convert the folder in memory and return the model (params in `param_dtype`, default `dtype`)."""
    return convert(read_config(component_dir), tensor_source(component_dir), dtype=dtype,
                   param_dtype=dtype if param_dtype is None else param_dtype,
                   attention_backend=attention_backend, label=str(component_dir))


def convert(config: HunyuanClipConfig, source, *, dtype=jnp.float32, param_dtype=jnp.float32,
            attention_backend=None, label: str = "hunyuan_clip") -> HunyuanClip:
    """The model with weights from any tensor source holding the official `bert.*` keys."""
    skipped = ignored_keys(source)
    if skipped:
        log.info("%s: ignoring %d tensors outside the BERT text tower (e.g. %s)", label, len(skipped),
                 skipped[0])
    model = nnx.eval_shape(lambda: build(config, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(0),
                                         attention_backend=attention_backend))
    return convert_model(model, source, rules(config), dtype=param_dtype, ignore=IGNORE, label=label)
