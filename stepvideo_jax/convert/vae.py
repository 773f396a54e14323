"""VAE component: `vae/vae_v2.safetensors` of the release (one file, no config).

The release ships no VAE config, so `read_config` reads the architecture from the tensor shapes
(widths, latent channels, block counts, which levels resample in time) and checks it against the
fixed version-2 layout. Key names are the released ones: the module attribute
`decoder.conv_out.conv.*` is stored as `decoder.conv_out.*` (the official loader renames it back).

Layouts: Conv3d (O, I, kt, kh, kw) -> (kt, kh, kw, I, O); Conv2d (O, I, kh, kw) -> (kh, kw, I, O);
1x1x1 convs (O, I, 1, 1, 1) -> (I, O) kernels of `Linear`; GroupNorm weight/bias unchanged.
"""
from __future__ import annotations

import pathlib

import jax.numpy as jnp
import numpy as np
from flax import nnx

from stepvideo_jax.convert import release_paths
from stepvideo_jax.convert.errors import CheckpointError
from stepvideo_jax.convert.keymap import Rule, convert_model
from stepvideo_jax.convert.safetensors_io import TensorSource
from stepvideo_jax.models.vae import VAEConfig, VideoVAE

COMPONENT = "vae"
FILENAME = "vae_v2.safetensors"
IGNORE: tuple[str, ...] = ()


def _file(component_dir, root=None) -> pathlib.Path:
    """`component_dir/vae_v2.safetensors` (inside `root`, see `release_paths`), or the path itself
    when it names a file."""
    path = pathlib.Path(component_dir)
    if path.is_file():
        return path
    target = path / FILENAME
    release_paths.release_file(path, FILENAME, root)
    if not target.is_file():
        found = sorted(p.name for p in path.glob("*.safetensors")) if path.is_dir() else []
        raise CheckpointError(f"{target}: not found (the release keeps the version-2 VAE in "
                              f"vae/{FILENAME}; safetensors files here: {found or 'none'})")
    return target


def tensor_source(component_dir, root=None) -> TensorSource:
    source = TensorSource.single(_file(component_dir, root))
    if "decoder.conv_out.conv.weight" in source.keys():
        raise CheckpointError(
            f"{_file(component_dir)}: holds 'decoder.conv_out.conv.weight', i.e. a module state_dict; "
            "the released file (and the official loader) names it 'decoder.conv_out.weight'")
    return source


def config_from_shapes(shapes: dict[str, tuple[int, ...]], *, label: str = FILENAME) -> VAEConfig:
    """The architecture implied by the official tensor names and shapes (see the module docstring)."""

    def shape(key: str) -> tuple[int, ...]:
        if key not in shapes:
            raise CheckpointError(f"{label}: missing required tensor {key!r}; is this a version-2 "
                                  "Step-Video VAE (vae_v2.safetensors)?")
        return tuple(shapes[key])

    def count(pattern: str) -> int:
        n = 0
        while any(k.startswith(pattern.format(n) + ".") for k in shapes):
            n += 1
        return n

    shape("encoder.conv_patchify.conv.conv.weight")
    z = shape("decoder.conv_in.conv.weight")[1]
    n_enc, n_dec = count("encoder.down.{}"), count("decoder.up.{}")
    blocks = count("encoder.down.0.block.{}")
    dec_blocks = count("decoder.up.0.block.{}")
    if n_enc < 1 or n_dec < 1 or blocks < 1:
        raise CheckpointError(f"{label}: no encoder.down.* / decoder.up.* blocks found")
    if dec_blocks != blocks + 1:
        raise CheckpointError(f"{label}: decoder levels have {dec_blocks} resnets, expected "
                              f"encoder's {blocks} + 1")
    cfg = VAEConfig(
        z_channels=z,
        in_channels=shape("encoder.conv_in.conv.weight")[1],
        out_channels=shape("decoder.conv_out.weight")[0],
        encoder_stem=shape("encoder.conv_in.conv.weight")[0],
        encoder_widths=tuple(shape(f"encoder.down.{i}.block.0.conv2.conv.weight")[0] for i in range(n_enc)),
        decoder_widths=tuple(shape(f"decoder.up.{i}.block.0.conv2.conv.weight")[0] for i in range(n_dec)),
        num_res_blocks=blocks,
        encoder_temporal_levels=tuple(i for i in range(n_enc)
                                      if f"encoder.down.{i}.downsample.conv.conv.weight" in shapes),
        decoder_temporal_levels=tuple(i for i in range(n_dec)
                                      if f"decoder.up.{i}.upsample.conv3d.conv1.conv.weight" in shapes),
    )
    patch = shape("decoder.conv_in.conv.weight")[0]
    if patch != cfg.patch_channels:
        raise CheckpointError(f"{label}: decoder.conv_in has {patch} output channels; version 2 has "
                              f"4 * z_channels * 8 = {cfg.patch_channels}")
    return cfg


def read_config(component_dir, root=None) -> VAEConfig:
    source = tensor_source(component_dir, root)
    return config_from_shapes({k: source.shape(k) for k in source.keys()}, label=str(_file(component_dir, root)))


def _conv3d(w: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(w.transpose(2, 3, 4, 1, 0))


def _conv2d(w: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(w.transpose(2, 3, 1, 0))


def _pointwise(w: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(w.reshape(w.shape[0], w.shape[1]).T)


def _conv(src: str, dst: str, transform=_conv3d) -> list[Rule]:
    return [Rule(f"{src}.weight", f"{dst}/kernel", transform), Rule(f"{src}.bias", f"{dst}/bias")]


def _norm(src: str, dst: str) -> list[Rule]:
    return [Rule(f"{src}.weight", f"{dst}/weight"), Rule(f"{src}.bias", f"{dst}/bias")]


def _resnet(src: str, dst: str, with_shortcut: bool) -> list[Rule]:
    out = (_norm(f"{src}.norm1", f"{dst}/norm1") + _conv(f"{src}.conv1.conv", f"{dst}/conv1")
           + _norm(f"{src}.norm2", f"{dst}/norm2") + _conv(f"{src}.conv2.conv", f"{dst}/conv2"))
    if with_shortcut:
        out += _conv(f"{src}.nin_shortcut.conv", f"{dst}/nin_shortcut", _pointwise)
    return out


def _middle(src: str, dst: str) -> list[Rule]:
    attn = _norm(f"{src}.mid.attn_1.norm", f"{dst}/mid_attn_1/norm")
    for name in ("q", "k", "v", "proj_out"):
        attn += _conv(f"{src}.mid.attn_1.{name}.conv", f"{dst}/mid_attn_1/{name}", _pointwise)
    return (_resnet(f"{src}.mid.block_1", f"{dst}/mid_block_1", False) + attn
            + _resnet(f"{src}.mid.block_2", f"{dst}/mid_block_2", False))


def rules(cfg: VAEConfig) -> list[Rule]:
    out = _conv("encoder.conv_in.conv", "encoder/conv_in")
    cin, last = cfg.encoder_stem, len(cfg.encoder_widths) - 1
    for i, width in enumerate(cfg.encoder_widths):
        for j in range(cfg.num_res_blocks):
            out += _resnet(f"encoder.down.{i}.block.{j}", f"encoder/down/{i}/blocks/{j}",
                           (cin if j == 0 else width) != width)
        if i in cfg.encoder_temporal_levels and i != last:
            out += _conv(f"encoder.down.{i}.downsample.conv.conv", f"encoder/down/{i}/resample")
        elif i != last:
            out += _conv(f"encoder.down.{i}.downsample.conv", f"encoder/down/{i}/resample", _conv2d)
        cin = width
    out += _middle("encoder", "encoder")
    out += _norm("encoder.norm_out", "encoder/norm_out")
    out += _conv("encoder.conv_patchify.conv.conv", "encoder/conv_patchify")
    out += _conv("encoder.conv_out.conv", "encoder/conv_out")

    top = cfg.decoder_widths[-1]
    out += _conv("decoder.conv_in.conv", "decoder/conv_in")
    out += _conv("decoder.conv_unpatchify.conv.conv", "decoder/conv_unpatchify")
    out += _middle("decoder", "decoder")
    cin = top
    for i in reversed(range(len(cfg.decoder_widths))):
        width = cfg.decoder_widths[i]
        for j in range(cfg.num_res_blocks + 1):
            out += _resnet(f"decoder.up.{i}.block.{j}", f"decoder/up/{i}/blocks/{j}",
                           (cin if j == 0 else width) != width)
        if i in cfg.decoder_temporal_levels and i != 0:
            up, dst = f"decoder.up.{i}.upsample.conv3d", f"decoder/up/{i}/resample"
            out += (_conv(f"{up}.conv1.conv", f"{dst}/conv1") + _norm(f"{up}.norm1", f"{dst}/norm1")
                    + _conv(f"{up}.conv2.conv", f"{dst}/conv2") + _norm(f"{up}.norm2", f"{dst}/norm2"))
        elif i != 0:
            out += _conv(f"decoder.up.{i}.upsample.conv", f"decoder/up/{i}/resample/conv", _conv2d)
        cin = width
    out += _norm("decoder.norm_out", "decoder/norm_out")
    out += _conv("decoder.conv_out", "decoder/conv_out")
    return out


def build(cfg: VAEConfig, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs,
          attention_backend=None) -> VideoVAE:
    return VideoVAE(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs, attention_backend=attention_backend)


def convert(cfg: VAEConfig, source, *, dtype=jnp.float32, param_dtype=jnp.float32,
            attention_backend=None, label: str = "vae") -> VideoVAE:
    """The model with weights from any `TensorSource` holding the released keys."""
    model = nnx.eval_shape(lambda: build(cfg, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(0),
                                         attention_backend=attention_backend))
    return convert_model(model, source, rules(cfg), dtype=param_dtype, ignore=IGNORE, label=label)


def load(component_dir, *, dtype=jnp.float32, param_dtype=None, attention_backend=None) -> VideoVAE:
    """Convert `vae/` (or a `.safetensors` path) in memory and return the model (tests, inference)."""
    param_dtype = dtype if param_dtype is None else param_dtype
    return convert(read_config(component_dir), tensor_source(component_dir), dtype=dtype,
                   param_dtype=param_dtype, attention_backend=attention_backend, label=str(_file(component_dir)))
