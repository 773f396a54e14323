"""Export a DiT back to the official release layout: `transformer/` with safetensors shards + index.

Writes `config.json` (diffusers-style `StepVideoModel`), `diffusion_pytorch_model-0000i-of-0000n
.safetensors` and `diffusion_pytorch_model.safetensors.index.json` (`metadata.total_size`,
`weight_map`), official key names, torch layouts (`nn.Linear.weight` (out, in), the patch-embed
conv (d, c, p, p), the head-interleaved fused `attn1.wqkv` and `attn2.wkv`).

The export is the exact inverse of the converter's own key map (`convert/dit.py: rules`): each
official tensor's element positions are pushed through the rules' transforms as an index array,
which tells where every converted element came from; scattering our values back through those
positions inverts any transform that only moves elements (transpose, reshape, head
de-interleaving). A transform that is not such a permutation is reported, never guessed.

`link_release(RELEASE, DIR)` makes DIR a complete release directory around an export into
`DIR/transformer/`: every other entry of RELEASE (vae/, step_llm/, hunyuan_clip/, scheduler/,
model_index.json) is symlinked. The command line (any weight source -> this layout) is
`python -m stepvideo_jax.export`.

Atomic: the export is written into a temporary sibling of the destination and renamed into place
when complete; on any error the destination is untouched (absent, or the previous export). An
existing destination is replaced only if it is empty or an export this tool wrote (its index's
`metadata.exported_by`); files get mode 0644.
"""
from __future__ import annotations

import collections
import dataclasses
import json
import os
import pathlib
import re
import shutil
import uuid
from typing import Iterator, Mapping

import numpy as np
import safetensors.numpy
from flax import nnx

from stepvideo_jax import hub
from stepvideo_jax.convert import dit as dit_convert
from stepvideo_jax.convert.errors import CheckpointError
from stepvideo_jax.convert.keymap import checkpoint_arrays, flat_shapes
from stepvideo_jax.dtypes import DTYPES
from stepvideo_jax.models.dit import DiTConfig

LINKED = ("vae", "step_llm", "hunyuan_clip")   # the release components an exported transformer/ is paired with
EXPORTED_BY = "stepvideo_jax.convert.export_dit"
FILE_MODE = 0o644
_SHARD = re.compile(r"diffusion_pytorch_model-\d{5}-of-\d{5}\.safetensors")


def official_shapes(cfg: DiTConfig) -> dict[str, tuple[int, ...]]:
    """Shape of every official tensor of `StepVideoModel` with config `cfg`."""
    d, hd, p = cfg.dim, cfg.head_dim, cfg.patch_size
    shapes = {
        "pos_embed.proj.weight": (d, cfg.in_channels * (2 if cfg.ti2v else 1), p, p), "pos_embed.proj.bias": (d,),
        "adaln_single.emb.timestep_embedder.linear_1.weight": (d, cfg.timestep_dim),
        "adaln_single.emb.timestep_embedder.linear_1.bias": (d,),
        "adaln_single.emb.timestep_embedder.linear_2.weight": (d, d),
        "adaln_single.emb.timestep_embedder.linear_2.bias": (d,),
        "adaln_single.linear.weight": (6 * d, d), "adaln_single.linear.bias": (6 * d,),
        "caption_projection.linear_1.weight": (d, cfg.caption_channels[0]), "caption_projection.linear_1.bias": (d,),
        "caption_projection.linear_2.weight": (d, d), "caption_projection.linear_2.bias": (d,),
        "clip_projection.weight": (d, cfg.caption_channels[1]), "clip_projection.bias": (d,),
        "scale_shift_table": (2, d),
        "proj_out.weight": (p * p * cfg.out_channels, d), "proj_out.bias": (p * p * cfg.out_channels,),
    }
    block = {"norm1.weight": (d,), "norm1.bias": (d,), "attn1.wqkv.weight": (3 * d, d),
             "attn1.q_norm.weight": (hd,), "attn1.k_norm.weight": (hd,), "attn1.wo.weight": (d, d),
             "norm2.weight": (d,), "norm2.bias": (d,), "attn2.wq.weight": (d, d), "attn2.wkv.weight": (2 * d, d),
             "attn2.q_norm.weight": (hd,), "attn2.k_norm.weight": (hd,), "attn2.wo.weight": (d, d),
             "ff.net.0.proj.weight": (4 * d, d), "ff.net.2.weight": (d, 4 * d), "scale_shift_table": (6, d)}
    if cfg.ti2v:
        m = "adaln_single.emb.motion_score_embedder"
        shapes.update({f"{m}.linear_1.weight": (d, cfg.timestep_dim), f"{m}.linear_1.bias": (d,),
                       f"{m}.linear_2.weight": (d, d), f"{m}.linear_2.bias": (d,)})
    for i in range(cfg.num_layers):
        shapes.update({f"transformer_blocks.{i}.{k}": v for k, v in block.items()})
    return shapes


def release_config(cfg: DiTConfig) -> dict:
    """`transformer/config.json` content for `cfg` (the release's keys and fixed values)."""
    return {"_class_name": "StepVideoModel", "_diffusers_version": "0.31.0",
            "attention_head_dim": cfg.head_dim, "attention_type": "parallel",
            "caption_channels": list(cfg.caption_channels), "dropout": 0.0, "in_channels": cfg.in_channels,
            "norm_elementwise_affine": False, "norm_eps": cfg.norm_eps, "norm_type": "ada_norm_single",
            "num_attention_heads": cfg.num_heads, "num_layers": cfg.num_layers, "out_channels": cfg.out_channels,
            "patch_size": cfg.patch_size, "use_additional_conditions": cfg.ti2v}


def official_tensors(cfg: DiTConfig, params: Mapping[str, np.ndarray]) -> Iterator[tuple[str, np.ndarray]]:
    """(official key, tensor) for every official key, in key-map order; `params` maps our '/'-joined
    state paths to arrays (any array type; read one at a time)."""
    shapes = official_shapes(cfg)
    by_src: dict[str, list] = collections.OrderedDict()
    for rule in dit_convert.rules(cfg):
        by_src.setdefault(rule.src, []).append(rule)
    unknown = sorted(set(by_src) - set(shapes))
    if unknown:
        raise CheckpointError(f"key map has official keys without a known shape: {unknown[:8]}")
    for src, rules in by_src.items():
        shape = shapes[src]
        positions = np.arange(int(np.prod(shape)), dtype=np.int64).reshape(shape)
        out = np.empty(int(np.prod(shape)), np.float32)
        hits = np.zeros(out.shape, np.int32)
        for rule in rules:
            where = np.asarray(rule.transform(positions))
            value = np.asarray(params[rule.dst], np.float32)
            if (where.shape != value.shape or where.dtype != np.int64
                    or (where.size and (where.min() < 0 or where.max() >= out.size))):
                raise CheckpointError(f"{src} -> {rule.dst}: the transform is not an element permutation "
                                      f"(maps {shape} to {where.shape} {where.dtype}, model has {value.shape})")
            out[where.ravel()] = value.ravel()
            hits[where.ravel()] += 1
        if not np.all(hits == 1):
            raise CheckpointError(f"{src}: the key map covers {int(np.sum(hits > 0))} of {hits.size} elements "
                                  f"({int(np.sum(hits > 1))} more than once); cannot invert it")
        yield src, out.reshape(shape)


def flat_params(model: nnx.Module) -> dict[str, object]:
    """Checkpoint key (`keymap.flat_shapes`: one per layer of the stacked blocks) -> array; slices
    of device arrays are fetched lazily by `official_tensors`."""
    return dict(checkpoint_arrays(nnx.state(model, nnx.Param)))


def export(model: nnx.Module, out_dir: str | os.PathLike, *, dtype: str = "bfloat16",
           max_shard_bytes: int = 5 * 2**30) -> pathlib.Path:
    """Write `model` (a `StepVideoDiT`) as an official `transformer/` directory; returns its path."""
    if dtype not in DTYPES:
        raise ValueError(f"unknown export dtype {dtype!r}; choose one of {sorted(DTYPES)}")
    cfg = model.cfg
    expressible = dit_convert.config_from_dict(release_config(cfg))
    differ = [f"{f.name}={getattr(cfg, f.name)!r} (release: {getattr(expressible, f.name)!r})"
              for f in dataclasses.fields(cfg) if getattr(cfg, f.name) != getattr(expressible, f.name)]
    if differ:
        raise CheckpointError("the official StepVideoModel cannot express this DiT (its config.json fixes "
                              f"these values): {', '.join(differ)}")
    out = pathlib.Path(out_dir)
    _check_replaceable(out)
    params = flat_params(model)
    missing = sorted(set(flat_shapes(nnx.state(model, nnx.Param))) - set(params))
    if missing:
        raise CheckpointError(f"model state lacks {missing[:8]}")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{uuid.uuid4().hex[:8]}"
    try:
        tmp.mkdir()
        _write(cfg, params, tmp, dtype, max_shard_bytes)
        _replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _write(cfg: DiTConfig, params, out: pathlib.Path, dtype: str, max_shard_bytes: int) -> None:
    """Shards (at most `max_shard_bytes` each, unless one tensor is larger), index and config in `out`."""
    shards: list[dict[str, np.ndarray]] = [{}]
    sizes = [0]
    for key, tensor in official_tensors(cfg, params):
        tensor = tensor.astype(DTYPES[dtype])
        if sizes[-1] and sizes[-1] + tensor.nbytes > max_shard_bytes:
            shards.append({})
            sizes.append(0)
        shards[-1][key] = tensor
        sizes[-1] += tensor.nbytes
    n = len(shards)
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"diffusion_pytorch_model-{i + 1:05d}-of-{n:05d}.safetensors"
        safetensors.numpy.save_file(shard, str(out / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in shard})
    index = {"metadata": {"total_size": int(sum(sizes)), "exported_by": EXPORTED_BY},
             "weight_map": dict(sorted(weight_map.items()))}
    (out / dit_convert.INDEX).write_text(json.dumps(index, indent=2))
    (out / "config.json").write_text(json.dumps(release_config(cfg), indent=2))
    for path in out.iterdir():
        os.chmod(path, FILE_MODE)


def _check_replaceable(out: pathlib.Path) -> None:
    """An existing `out` may be replaced only if it is an empty directory or an export of this tool
    (only its file names, and an index marked `exported_by`): never a release or other data."""
    if not os.path.lexists(out):
        return
    if out.is_symlink() or not out.is_dir():
        raise CheckpointError(f"{out} exists and is not a directory (or is a symlink); it is never replaced")
    names = sorted(p.name for p in out.iterdir())
    if not names:
        return
    foreign = [n for n in names if n not in ("config.json", dit_convert.INDEX) and not _SHARD.fullmatch(n)]
    try:
        marked = json.loads((out / dit_convert.INDEX).read_text())["metadata"]["exported_by"] == EXPORTED_BY
    except (OSError, ValueError, KeyError, TypeError):
        marked = False
    if foreign or not marked:
        why = f"it holds {foreign[:4]}" if foreign else f"its index is not marked exported_by={EXPORTED_BY!r}"
        raise CheckpointError(f"{out} exists and is not an export this tool wrote ({why}); it is never "
                              "replaced: remove it yourself or choose another --out")


def _replace(tmp: pathlib.Path, out: pathlib.Path) -> None:
    """Rename the complete `tmp` to `out`; an existing `out` (checked again) is moved aside first,
    then deleted."""
    if not os.path.lexists(out):
        tmp.rename(out)
        return
    _check_replaceable(out)
    old = out.parent / f".{out.name}.replaced-{uuid.uuid4().hex[:8]}"
    out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old)


def link_release(release: str | os.PathLike, out: pathlib.Path) -> None:
    """Symlink every entry of `release` (a release directory or Hugging Face repo id) except
    `transformer/` into `out` (created)."""
    release = pathlib.Path(hub.resolve(release, LINKED)).absolute()
    missing = [c for c in LINKED if not (release / c).is_dir()]
    if missing:
        raise CheckpointError(f"{release} is not a release directory (no {', '.join(c + '/' for c in missing)})")
    out.mkdir(parents=True, exist_ok=True)
    for entry in release.iterdir():
        if entry.name != dit_convert.COMPONENT and not (out / entry.name).exists():
            (out / entry.name).symlink_to(entry)


if __name__ == "__main__":   # the command line moved up a layer, beside the weight loader
    raise SystemExit("error: the export command is `python -m stepvideo_jax.export` (same arguments)")
