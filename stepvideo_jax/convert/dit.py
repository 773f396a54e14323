"""DiT component: `transformer/` of the release (config.json + sharded safetensors + index).

`use_additional_conditions: true` in config.json is the Step-Video-TI2V DiT (`DiTConfig.ti2v`): its
`pos_embed.proj` reads 2 x in_channels (latents, then condition latents) and it has the four
`adaln_single.emb.motion_score_embedder.*` tensors; the key map then expects exactly those.

Official layouts handled here: `nn.Linear.weight` (out, in) -> kernel (in, out); the patch-embed conv
(d, c, p, p) -> (c*p*p, d); the head-interleaved fused projections `attn1.wqkv` (rows per head:
q, k, v) and `attn2.wkv` (per head: k, v) split into separate q/k/v kernels.
"""
from __future__ import annotations

import logging
import pathlib

import jax.numpy as jnp
import numpy as np
from flax import nnx

from stepvideo_jax.convert import release_paths
from stepvideo_jax.convert.errors import CheckpointError
from stepvideo_jax.convert.keymap import Rule, convert_model, expand, transpose
from stepvideo_jax.convert.safetensors_io import TensorSource
from stepvideo_jax.models.dit import DiTConfig, StepVideoDiT

COMPONENT = "transformer"
INDEX = "diffusion_pytorch_model.safetensors.index.json"
IGNORE: tuple[str, ...] = ()

_REQUIRED = {"num_attention_heads": "num_heads", "attention_head_dim": "head_dim",
             "in_channels": "in_channels", "num_layers": "num_layers", "caption_channels": "caption_channels"}
_OPTIONAL = {"out_channels": "out_channels", "patch_size": "patch_size", "norm_eps": "norm_eps",
             "use_additional_conditions": "ti2v"}
_KNOWN_UNUSED = {"_class_name", "_diffusers_version", "dropout", "norm_type", "norm_elementwise_affine",
                 "attention_type"}

log = logging.getLogger(__name__)


def config_from_dict(raw: dict, *, label: str = "transformer/config.json") -> DiTConfig:
    """Tolerant parse: unknown keys warn, missing required keys raise."""
    missing = sorted(k for k in _REQUIRED if k not in raw)
    if missing:
        raise CheckpointError(f"{label}: missing required keys {missing}")
    unknown = sorted(set(raw) - set(_REQUIRED) - set(_OPTIONAL) - _KNOWN_UNUSED)
    if unknown:
        log.warning("%s: ignoring unknown keys %s", label, unknown)
    if not isinstance(raw.get("use_additional_conditions", False), bool):
        raise CheckpointError(f"{label}: use_additional_conditions must be true (Step-Video-TI2V) or false "
                              f"(Step-Video-T2V), got {raw['use_additional_conditions']!r}")
    kw = {ours: raw[theirs] for theirs, ours in {**_REQUIRED, **_OPTIONAL}.items() if theirs in raw}
    kw["caption_channels"] = tuple(kw["caption_channels"])
    if "out_channels" not in kw or kw["out_channels"] is None:
        kw["out_channels"] = kw["in_channels"]
    return DiTConfig(**kw)


def read_config(component_dir, root=None) -> DiTConfig:
    """`config.json` of a release `transformer/` folder; `root`: see `release_paths`."""
    raw = release_paths.read_json(component_dir, "config.json", root, expected="transformer/config.json")
    return config_from_dict(raw, label=str(pathlib.Path(component_dir) / "config.json"))


def tensor_source(component_dir, root=None) -> TensorSource:
    """The shards the folder's index names, each checked to lie inside `root` (see `release_paths`)."""
    return TensorSource.from_index(pathlib.Path(component_dir) / INDEX, root)


def _fused(n_heads: int, n_parts: int, part: int):
    """Rows of a head-interleaved fused weight (n_heads*n_parts*hd, d) -> kernel (d, n_heads*hd)."""

    def take(w: np.ndarray) -> np.ndarray:
        hd = w.shape[0] // (n_heads * n_parts)
        return np.ascontiguousarray(w.reshape(n_heads, n_parts, hd, w.shape[1])[:, part]
                                    .reshape(n_heads * hd, w.shape[1]).T)

    return take


def _patch_kernel(w: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(w.reshape(w.shape[0], -1).T)


def rules(cfg: DiTConfig) -> list[Rule]:
    h = cfg.num_heads
    lin = lambda src, dst, bias=True: [Rule(f"{src}.weight", f"{dst}/kernel", transpose)] + (
        [Rule(f"{src}.bias", f"{dst}/bias")] if bias else [])
    b = "transformer_blocks.{i}"
    per_block = [
        Rule(f"{b}.norm1.weight", "blocks/{i}/norm1/weight"),
        Rule(f"{b}.norm1.bias", "blocks/{i}/norm1/bias"),
        Rule(f"{b}.attn1.wqkv.weight", "blocks/{i}/attn1/q/kernel", _fused(h, 3, 0)),
        Rule(f"{b}.attn1.wqkv.weight", "blocks/{i}/attn1/k/kernel", _fused(h, 3, 1)),
        Rule(f"{b}.attn1.wqkv.weight", "blocks/{i}/attn1/v/kernel", _fused(h, 3, 2)),
        Rule(f"{b}.attn1.q_norm.weight", "blocks/{i}/attn1/q_norm/weight"),
        Rule(f"{b}.attn1.k_norm.weight", "blocks/{i}/attn1/k_norm/weight"),
        *lin(f"{b}.attn1.wo", "blocks/{i}/attn1/o", bias=False),
        Rule(f"{b}.norm2.weight", "blocks/{i}/norm2/weight"),
        Rule(f"{b}.norm2.bias", "blocks/{i}/norm2/bias"),
        *lin(f"{b}.attn2.wq", "blocks/{i}/attn2/q", bias=False),
        Rule(f"{b}.attn2.wkv.weight", "blocks/{i}/attn2/k/kernel", _fused(h, 2, 0)),
        Rule(f"{b}.attn2.wkv.weight", "blocks/{i}/attn2/v/kernel", _fused(h, 2, 1)),
        Rule(f"{b}.attn2.q_norm.weight", "blocks/{i}/attn2/q_norm/weight"),
        Rule(f"{b}.attn2.k_norm.weight", "blocks/{i}/attn2/k_norm/weight"),
        *lin(f"{b}.attn2.wo", "blocks/{i}/attn2/o", bias=False),
        *lin(f"{b}.ff.net.0.proj", "blocks/{i}/ff/fc1", bias=False),
        *lin(f"{b}.ff.net.2", "blocks/{i}/ff/fc2", bias=False),
        Rule(f"{b}.scale_shift_table", "blocks/{i}/scale_shift_table"),
    ]
    top = [
        Rule("pos_embed.proj.weight", "patch_embed/kernel", _patch_kernel),
        Rule("pos_embed.proj.bias", "patch_embed/bias"),
        *lin("adaln_single.emb.timestep_embedder.linear_1", "time_linear_1"),
        *lin("adaln_single.emb.timestep_embedder.linear_2", "time_linear_2"),
        *(lin("adaln_single.emb.motion_score_embedder.linear_1", "motion_linear_1")
          + lin("adaln_single.emb.motion_score_embedder.linear_2", "motion_linear_2") if cfg.ti2v else []),
        *lin("adaln_single.linear", "adaln"),
        *lin("caption_projection.linear_1", "caption_linear_1"),
        *lin("caption_projection.linear_2", "caption_linear_2"),
        *lin("clip_projection", "clip_projection"),
        Rule("scale_shift_table", "scale_shift_table"),
        *lin("proj_out", "proj_out"),
    ]
    return top + expand(per_block, cfg.num_layers)


def build(cfg: DiTConfig, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs) -> StepVideoDiT:
    return StepVideoDiT(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)


def load(component_dir, *, dtype=jnp.float32, param_dtype=jnp.float32) -> StepVideoDiT:
    """Convert `transformer/` in memory and return the model (tests, small checkpoints)."""
    cfg = read_config(component_dir)
    return convert(cfg, tensor_source(component_dir), dtype=dtype, param_dtype=param_dtype,
                   label=str(component_dir))


def convert(cfg: DiTConfig, source, *, dtype=jnp.float32, param_dtype=jnp.float32,
            label: str = "transformer") -> StepVideoDiT:
    """The model with weights from any `TensorSource` holding the official keys."""
    model = nnx.eval_shape(lambda: build(cfg, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(0)))
    return convert_model(model, source, rules(cfg), dtype=param_dtype, ignore=IGNORE, label=label)
