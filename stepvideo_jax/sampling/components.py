"""The four models of a text-to-video run: from a checkpoint directory, or tiny and random.

Two checkpoint layouts are read:
- a converted checkpoint (`python -m stepvideo_jax.convert` output, `conversion.json` at the top):
  each `<component>/` holds an Orbax manifest and the tokenizer files; restored straight into the
  mesh's shardings when a mesh is given;
- an official release directory (`stepfun-ai/stepvideo-t2v` as published): `transformer/`
  (config.json + sharded safetensors + index), `vae/vae_v2.safetensors`, `step_llm/` (config.json,
  shards + index, step1_chat_tokenizer.model), `hunyuan_clip/` (`clip_text_encoder/` config.json +
  weights, `tokenizer/vocab.txt`), each converted in memory by `stepvideo_jax.convert.<component>`.

The tiny random set needs no download: all four at random init with mutually consistent widths
(DiT caption channels = [Step-LLM width, CLIP width], DiT channels = VAE latent channels) and the
released tokenizers shipped in the package, so the vocabularies are the released ones.
"""
from __future__ import annotations

import dataclasses
import pathlib
from typing import Callable, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

CONVERTED_MARKER = "conversion.json"
# component -> files (relative to the checkpoint directory) that must all exist; alternatives as tuples
CONVERTED_FILES: Mapping[str, tuple] = {
    "transformer": ("transformer/manifest.json",),
    "vae": ("vae/manifest.json",),
    "step_llm": ("step_llm/manifest.json", "step_llm/step1_chat_tokenizer.model"),
    "hunyuan_clip": ("hunyuan_clip/manifest.json", "hunyuan_clip/tokenizer/vocab.txt"),
}
RELEASE_FILES: Mapping[str, tuple] = {
    "transformer": ("transformer/config.json", "transformer/diffusion_pytorch_model.safetensors.index.json"),
    "vae": ("vae/vae_v2.safetensors",),
    "step_llm": ("step_llm/config.json",
                 ("step_llm/model.safetensors.index.json", "step_llm/model.safetensors"),
                 "step_llm/step1_chat_tokenizer.model"),
    "hunyuan_clip": ("hunyuan_clip/clip_text_encoder/config.json",
                     ("hunyuan_clip/clip_text_encoder/pytorch_model.bin",
                      "hunyuan_clip/clip_text_encoder/model.safetensors"),
                     "hunyuan_clip/tokenizer/vocab.txt"),
}


def is_converted(path) -> bool:
    return (pathlib.Path(path) / CONVERTED_MARKER).is_file()


def check_checkpoint_dir(path) -> pathlib.Path:
    """Raise a ValueError listing every missing component file, before anything is loaded."""
    path = pathlib.Path(path)
    if not path.is_dir():
        raise ValueError(f"checkpoint_dir {path} is not a directory (expected a Step-Video-T2V release "
                         f"or a converted checkpoint with {', '.join(c + '/' for c in RELEASE_FILES)})")
    layout = CONVERTED_FILES if is_converted(path) else RELEASE_FILES
    missing = []
    for component, files in layout.items():
        for entry in files:
            options = entry if isinstance(entry, tuple) else (entry,)
            if not any((path / f).is_file() for f in options):
                missing.append(f"{component}: {' or '.join(options)}")
    if missing:
        kind = "converted checkpoint" if layout is CONVERTED_FILES else "release directory"
        raise ValueError(f"checkpoint_dir {path} ({kind}) is missing component files: " + "; ".join(missing))
    return path


@dataclasses.dataclass
class Models:
    """`text` maps prompts to DiT text inputs (`text.conditioning.TextConditioner`); `dit` and `vae`
    are the NNX modules."""

    text: Callable
    dit: nnx.Module
    vae: nnx.Module


def vae_decoder(vae: nnx.Module, **decode_kw) -> Callable[[jax.Array], jax.Array]:
    """latents (b, f, c, h, w) -> video (b, F, 3, H, W) float32, jitted once per latent shape."""
    graphdef, state = nnx.split(vae)

    @jax.jit
    def decode(state, latents):
        return nnx.merge(graphdef, state).decode(latents, **decode_kw).astype(jnp.float32)

    return lambda latents: decode(state, latents)


def from_checkpoint(path, *, mesh=None, **kw) -> Models:
    """A converted checkpoint (restored into `mesh`'s shardings if given) or a release directory
    (converted in memory, on one device: convert it first to shard it)."""
    path = check_checkpoint_dir(path)
    if is_converted(path):
        return from_converted(path, mesh=mesh, **kw)
    if mesh is not None:
        raise ValueError(f"checkpoint_dir {path} is a release directory, which loads on one device; to "
                         "shard the models over a mesh, convert it first (python -m stepvideo_jax.convert)")
    return from_release(path, **kw)


def from_converted(path, *, mesh=None, dit_dtype=jnp.bfloat16, vae_dtype=jnp.bfloat16,
                   llm_dtype=jnp.bfloat16, clip_dtype=jnp.float32, attention_backend: str | None = None,
                   bf16_mask_sum: bool = False) -> Models:
    """Restore the four components of a `python -m stepvideo_jax.convert` output."""
    from stepvideo_jax.convert import cli, orbax_io
    from stepvideo_jax.text.conditioning import TextConditioner
    from stepvideo_jax.text.sentencepiece_tokenizer import StepLLMTokenizer
    from stepvideo_jax.text.wordpiece_tokenizer import WordPieceTokenizer

    path = check_checkpoint_dir(path)
    cfgs = {c: cli.config_from_record(orbax_io.read_manifest(path / c)["config"]) for c in CONVERTED_FILES}
    check_fit(cfgs["transformer"], cfgs["step_llm"].hidden_size, cfgs["hunyuan_clip"].hidden_size,
              cfgs["vae"].z_channels)
    load = lambda c, dtype: cli.load_converted(path, c, param_dtype=dtype, mesh=mesh)  # noqa: E731
    text = TextConditioner(step_llm=load("step_llm", llm_dtype),
                           llm_tokenizer=StepLLMTokenizer(path / "step_llm" / "step1_chat_tokenizer.model"),
                           clip=load("hunyuan_clip", clip_dtype),
                           clip_tokenizer=WordPieceTokenizer.from_dir(path / "hunyuan_clip" / "tokenizer"),
                           attention_backend=attention_backend, bf16_mask_sum=bf16_mask_sum)
    return Models(text=text, dit=load("transformer", dit_dtype), vae=load("vae", vae_dtype))


def from_release(path, *, dit_dtype=jnp.bfloat16, vae_dtype=jnp.bfloat16, llm_dtype=jnp.bfloat16,
                 clip_dtype=jnp.float32, attention_backend: str | None = None,
                 bf16_mask_sum: bool = False) -> Models:
    """Convert every component of a release directory in memory (defaults: the official dtypes).

    The configs are read and checked against each other before any weight is loaded.
    """
    from stepvideo_jax.convert import dit as dit_convert
    from stepvideo_jax.convert import hunyuan_clip as clip_convert
    from stepvideo_jax.convert import step_llm as llm_convert
    from stepvideo_jax.convert import vae as vae_convert
    from stepvideo_jax.text.conditioning import TextConditioner

    path = check_checkpoint_dir(path)
    dit_cfg = dit_convert.read_config(path / "transformer")
    check_fit(dit_cfg, llm_convert.read_config(path / "step_llm").hidden_size,
              clip_convert.read_config(path / "hunyuan_clip").hidden_size, None)
    vae = vae_convert.load(path / "vae", dtype=vae_dtype)
    check_fit(dit_cfg, None, None, vae.cfg.z_channels)
    text = TextConditioner.from_release(path, llm_dtype=llm_dtype, clip_dtype=clip_dtype,
                                        attention_backend=attention_backend, bf16_mask_sum=bf16_mask_sum)
    dit = dit_convert.load(path / "transformer", dtype=dit_dtype, param_dtype=dit_dtype)
    return Models(text=text, dit=dit, vae=vae)


def tiny_random(dims: Mapping, *, seed: int = 0, mesh=None, dit_dtype=jnp.float32, vae_dtype=jnp.float32,
                llm_dtype=jnp.float32, clip_dtype=jnp.float32, attention_backend: str | None = None,
                bf16_mask_sum: bool = False) -> Models:
    """All four models at random init from `dims` (keys `dit`, `vae`, `step_llm`, `clip`, each a
    mapping of config fields), with the released tokenizers and their vocabulary sizes. The DiT's
    caption and latent channels follow from the other three unless `dims` sets them. With `mesh`
    the parameters are placed by the logical-axis rules."""
    from stepvideo_jax.models.dit import DiTConfig, StepVideoDiT
    from stepvideo_jax.models.hunyuan_clip import HunyuanClip, HunyuanClipConfig
    from stepvideo_jax.models.step_llm import StepLLM, StepLLMConfig
    from stepvideo_jax.models.vae import VAEConfig, VideoVAE
    from stepvideo_jax.text.conditioning import TextConditioner
    from stepvideo_jax.text.sentencepiece_tokenizer import StepLLMTokenizer
    from stepvideo_jax.text.wordpiece_tokenizer import WordPieceTokenizer

    llm_tokenizer, clip_tokenizer = StepLLMTokenizer(), WordPieceTokenizer.released()
    llm_cfg = StepLLMConfig(**{"vocab_size": llm_tokenizer.vocab_size, **_fields(dims["step_llm"])})
    clip_cfg = HunyuanClipConfig(**{"vocab_size": max(clip_tokenizer.vocab.values()) + 1,
                                    **_fields(dims["clip"])})
    vae_cfg = VAEConfig(**_fields(dims["vae"]))
    dit_cfg = DiTConfig(**{"in_channels": vae_cfg.z_channels, "out_channels": vae_cfg.z_channels,
                           "caption_channels": (llm_cfg.hidden_size, clip_cfg.hidden_size),
                           **_fields(dims["dit"])})
    check_fit(dit_cfg, llm_cfg.hidden_size, clip_cfg.hidden_size, vae_cfg.z_channels)
    # RBG keys: eager init compiles one sampler per parameter shape, several times faster than threefry
    rngs = nnx.Rngs(jax.random.key(seed, impl="rbg"))
    kw = lambda dtype: dict(dtype=dtype, param_dtype=dtype, rngs=rngs)  # noqa: E731
    place = _placer(mesh)
    text = TextConditioner(step_llm=place(StepLLM(llm_cfg, **kw(llm_dtype))), llm_tokenizer=llm_tokenizer,
                           clip=place(HunyuanClip(clip_cfg, attention_backend=attention_backend, **kw(clip_dtype))),
                           clip_tokenizer=clip_tokenizer, attention_backend=attention_backend,
                           bf16_mask_sum=bf16_mask_sum)
    return Models(text=text, dit=place(StepVideoDiT(dit_cfg, **kw(dit_dtype))),
                  vae=place(VideoVAE(vae_cfg, attention_backend=attention_backend, **kw(vae_dtype))))


def _placer(mesh):
    if mesh is None:
        return lambda module: module
    from stepvideo_jax.parallel.mesh import shard_model

    return lambda module: shard_model(module, mesh)


def _fields(fields: Mapping) -> dict:
    """Config mapping -> dataclass kwargs (lists become tuples)."""
    return {k: tuple(v) if isinstance(v, list) else v for k, v in dict(fields).items()}


def check_fit(dit_cfg, llm_width: int | None, clip_width: int | None, z_channels: int | None) -> None:
    """The DiT must read the text encoders' widths and write the VAE's latent channels (None: skip)."""
    problems = []
    for name, want, got in (("Step-LLM hidden_size", dit_cfg.caption_channels[0], llm_width),
                            ("CLIP hidden_size", dit_cfg.caption_channels[1], clip_width)):
        if got is not None and got != want:
            problems.append(f"DiT caption_channels expects {name} {want}, got {got}")
    if z_channels is not None and not dit_cfg.in_channels == dit_cfg.out_channels == z_channels:
        problems.append(f"DiT in/out channels ({dit_cfg.in_channels}, {dit_cfg.out_channels}) != "
                        f"VAE z_channels {z_channels}")
    if problems:
        raise ValueError("the components do not fit together: " + "; ".join(problems))
