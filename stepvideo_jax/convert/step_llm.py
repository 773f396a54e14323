"""Step-LLM component: `step_llm/` of the release (config.json + sharded safetensors + index).

Official layouts handled here: `nn.Linear.weight` (out, in) -> kernel (in, out); the fused
`attention.wqkv` (rows: all q heads, then per kv group [k, v]) split into `wq`, `wk`, `wv`; the
fused `feed_forward.w1` (rows: gate, then up) split into `gate` and `up`.
"""
from __future__ import annotations

import logging
import os
import pathlib

import jax.numpy as jnp
import numpy as np
from flax import nnx

from stepvideo_jax.convert import release_paths
from stepvideo_jax.convert.errors import CheckpointError
from stepvideo_jax.convert.keymap import Rule, convert_model, expand, identity, transpose
from stepvideo_jax.convert.safetensors_io import TensorSource
from stepvideo_jax.models.step_llm import StepLLM, StepLLMConfig

COMPONENT = "step_llm"
INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
TOKENIZER = "step1_chat_tokenizer.model"
IGNORE: tuple[str, ...] = ()

_REQUIRED = {"padded_vocab_size": "vocab_size", "hidden_size": "hidden_size",
             "num_attention_heads": "num_heads", "num_attention_groups": "num_kv_groups",
             "num_layers": "num_layers", "ffn_hidden_size": "ffn_hidden_size", "layernorm_epsilon": "eps"}
# Keys of the released config that do not change inference (training, parallelism, provenance).
# `kv_channels` is ignored by the official code too (head_dim = hidden_size / heads).
_KNOWN_UNUSED = {"_name_or_path", "allow_transformer_engine", "architectures", "attention_dropout",
                 "attention_impl", "base_batch_size", "hidden_dropout", "kv_channels",
                 "max_position_embeddings", "orig_vocab_size", "overlap_p2p_comm", "params_dtype",
                 "seq_length", "swiglu_recompute_silu_dot", "tokens_to_generate", "torch_dtype",
                 "transformers_version", "use_flash_attn", "virtual_pipeline_model_parallel_size",
                 "embedding_weights_in_fp32", "fp32_residual_connection"}
# Flags whose non-release values would change the computation; only the released values are supported.
_FIXED = {"use_flash_attn": True, "embedding_weights_in_fp32": False, "fp32_residual_connection": False}

log = logging.getLogger(__name__)


def config_from_dict(raw: dict, *, label: str = "step_llm/config.json") -> StepLLMConfig:
    """Tolerant parse: unknown keys warn, missing required keys raise."""
    missing = sorted(k for k in _REQUIRED if k not in raw)
    if missing:
        raise CheckpointError(f"{label}: missing required keys {missing}")
    unknown = sorted(set(raw) - set(_REQUIRED) - _KNOWN_UNUSED)
    if unknown:
        log.warning("%s: ignoring unknown keys %s", label, unknown)
    for key, want in _FIXED.items():
        if key in raw and raw[key] != want:
            raise CheckpointError(f"{label}: {key}={raw[key]!r} is not supported; the Step-Video-T2V "
                                  f"release (and this port) use {want!r}")
    try:
        return StepLLMConfig(**{ours: raw[theirs] for theirs, ours in _REQUIRED.items()})
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{label}: {e}") from None


def read_config(component_dir, root=None) -> StepLLMConfig:
    """`config.json` of a release `step_llm/` folder; `root`: see `release_paths`."""
    raw = release_paths.read_json(component_dir, "config.json", root, expected="step_llm/config.json")
    return config_from_dict(raw, label=str(pathlib.Path(component_dir) / "config.json"))


def tensor_source(path: str | os.PathLike, root=None) -> TensorSource:
    """Weights of `path`: a `step_llm/` directory (its index json, else `model.safetensors`), an
    index json, or a single `.safetensors` file. Files found in or named by the directory or index
    must lie inside `root` (see `release_paths`)."""
    path = pathlib.Path(path)
    if path.is_dir():
        if (path / INDEX).is_file():
            return TensorSource.from_index(path / INDEX, root)
        if (path / SINGLE).is_file():
            release_paths.release_file(path, SINGLE, root)
            return TensorSource.single(path / SINGLE)
        raise CheckpointError(f"{path}: neither {INDEX} nor {SINGLE} found")
    if path.name.endswith(".json"):
        return TensorSource.from_index(path, root)
    return TensorSource.single(path)


def _checked(key: str, shape: tuple[int, int], take):
    """Wrap a slicing transform with a clear error when the fused source has the wrong shape."""

    def transform(w: np.ndarray) -> np.ndarray:
        if tuple(w.shape) != shape:
            raise CheckpointError(f"{key!r} has shape {tuple(w.shape)}; the config implies {shape}")
        return np.ascontiguousarray(take(w).T)

    return transform


def rules(cfg: StepLLMConfig) -> list[Rule]:
    d, hd, g, f = cfg.hidden_size, cfg.head_dim, cfg.num_kv_groups, cfg.ffn_inner
    wqkv = "transformer.layers.{i}.attention.wqkv.weight"
    w1 = "transformer.layers.{i}.feed_forward.w1.weight"
    qkv_shape, w1_shape = (d + 2 * g * hd, d), (2 * f, d)
    kv = lambda w, part: w[d:].reshape(g, 2, hd, d)[:, part].reshape(g * hd, d)
    per_layer = [
        Rule("transformer.layers.{i}.attention_norm.weight", "layers/{i}/attention_norm/weight", identity),
        Rule(wqkv, "layers/{i}/attention/wq/kernel", _checked(wqkv, qkv_shape, lambda w: w[:d])),
        Rule(wqkv, "layers/{i}/attention/wk/kernel", _checked(wqkv, qkv_shape, lambda w: kv(w, 0))),
        Rule(wqkv, "layers/{i}/attention/wv/kernel", _checked(wqkv, qkv_shape, lambda w: kv(w, 1))),
        Rule("transformer.layers.{i}.attention.wo.weight", "layers/{i}/attention/wo/kernel", transpose),
        Rule("transformer.layers.{i}.ffn_norm.weight", "layers/{i}/ffn_norm/weight", identity),
        Rule(w1, "layers/{i}/feed_forward/gate/kernel", _checked(w1, w1_shape, lambda w: w[:f])),
        Rule(w1, "layers/{i}/feed_forward/up/kernel", _checked(w1, w1_shape, lambda w: w[f:])),
        Rule("transformer.layers.{i}.feed_forward.w2.weight", "layers/{i}/feed_forward/down/kernel",
             transpose),
    ]
    return [Rule("tok_embeddings.word_embeddings.weight", "embed", identity)] + expand(per_layer,
                                                                                       cfg.num_layers)


def build(cfg: StepLLMConfig, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs) -> StepLLM:
    return StepLLM(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)


def convert(cfg: StepLLMConfig, source, *, dtype=jnp.float32, param_dtype=jnp.float32,
            label: str = COMPONENT) -> StepLLM:
    """The model with weights from any `TensorSource` holding the official keys."""
    model = nnx.eval_shape(lambda: build(cfg, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(0)))
    return convert_model(model, source, rules(cfg), dtype=param_dtype, ignore=IGNORE, label=label)


def load(component_dir, *, dtype=jnp.float32, param_dtype=None, weights=None) -> StepLLM:
    """Convert `step_llm/` in memory and return the model (tests, small checkpoints).

    `weights` overrides where the tensors come from (see `tensor_source`); `param_dtype` defaults
    to `dtype`.
    """
    cfg = read_config(component_dir)
    source = tensor_source(component_dir if weights is None else weights)
    return convert(cfg, source, dtype=dtype, param_dtype=dtype if param_dtype is None else param_dtype,
                   label=str(component_dir))
