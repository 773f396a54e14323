"""The four models of a text-to-video run: from a checkpoint directory, or tiny and random.

A `Loader` builds each component on demand (`text_encoder()`, `dit()`, `vae()`), so a run can encode
its prompts, release the text encoders and only then load the DiT; `from_checkpoint`,
`from_converted`, `from_release` and `tiny_random` build all four at once through it.

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

import abc
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


def vae_image_encoder(vae: nnx.Module) -> Callable[[jax.Array, jax.Array], jax.Array]:
    """(video (1, 1, 3, h, w), posterior noise (1, 1, z, h/16, w/16)) -> the posterior sample, float32
    (`image_condition.encode_condition`, the TI2V image condition), jitted once per size."""
    from stepvideo_jax.sampling.image_condition import encode_condition

    graphdef, state = nnx.split(vae)

    @jax.jit
    def encode(state, video, noise):
        return encode_condition(nnx.merge(graphdef, state), video, noise)

    return lambda video, noise: encode(state, video, noise)


class Loader(abc.ABC):
    """Builds each component on demand and keeps no reference to what it built, so a caller that
    drops a component (e.g. the text encoders once every prompt is encoded) frees its memory.

    The configs are read and checked against each other when the loader is made, before any weight
    is loaded. `mesh`: the mesh the parameters are placed on (None: one device).
    """

    mesh = None

    @abc.abstractmethod
    def text_encoder(self):
        """Step-LLM + Hunyuan-CLIP with their tokenizers (`text.conditioning.TextConditioner`)."""

    @abc.abstractmethod
    def dit(self) -> nnx.Module:
        """The `StepVideoDiT`."""

    @abc.abstractmethod
    def vae(self) -> nnx.Module:
        """The `VideoVAE`."""

    def llm_tokenizer(self):
        """The Step-LLM tokenizer the text encoder will use (no weights loaded), so that prompts can
        be tokenized before any model loads; None where the loader cannot give it alone."""
        return None

    def models(self) -> Models:
        """All four at once."""
        return Models(text=self.text_encoder(), dit=self.dit(), vae=self.vae())


def loader(path, *, mesh=None, **kw) -> Loader:
    """A converted checkpoint or a release directory, restored into `mesh`'s rule shardings if given
    (a release streams each tensor to its shards, `convert.release_restore`)."""
    path = check_checkpoint_dir(path)
    if is_converted(path):
        return ConvertedLoader(path, mesh=mesh, **kw)
    return ReleaseLoader(path, mesh=mesh, **kw)


def from_checkpoint(path, *, mesh=None, **kw) -> Models:
    """`loader(path, ...)`'s four models at once."""
    return loader(path, mesh=mesh, **kw).models()


class ConvertedLoader(Loader):
    """The components of a `python -m stepvideo_jax.convert` output, restored from Orbax."""

    def __init__(self, path, *, mesh=None, dit_dtype=jnp.bfloat16, vae_dtype=jnp.bfloat16,
                 llm_dtype=jnp.bfloat16, clip_dtype=jnp.float32, attention_backend: str | None = None,
                 bf16_mask_sum: bool = False):
        from stepvideo_jax.convert import cli, orbax_io

        self.path = check_checkpoint_dir(path)
        self.mesh, self.attention_backend, self.bf16_mask_sum = mesh, attention_backend, bf16_mask_sum
        self._llm_tokenizer = None
        self.dtypes = {"transformer": dit_dtype, "vae": vae_dtype, "step_llm": llm_dtype, "hunyuan_clip": clip_dtype}
        cfgs = {c: cli.config_from_record(orbax_io.read_manifest(self.path / c)["config"], c) for c in CONVERTED_FILES}
        check_fit(cfgs["transformer"], cfgs["step_llm"].hidden_size, cfgs["hunyuan_clip"].hidden_size,
                  cfgs["vae"].z_channels)

    def llm_tokenizer(self):
        from stepvideo_jax.text.sentencepiece_tokenizer import StepLLMTokenizer

        if self._llm_tokenizer is None:
            self._llm_tokenizer = StepLLMTokenizer(self.path / "step_llm" / "step1_chat_tokenizer.model")
        return self._llm_tokenizer

    def _load(self, component: str):
        from stepvideo_jax.convert import cli

        return cli.load_converted(self.path, component, param_dtype=self.dtypes[component], mesh=self.mesh)

    def text_encoder(self):
        from stepvideo_jax.text.conditioning import TextConditioner
        from stepvideo_jax.text.wordpiece_tokenizer import WordPieceTokenizer

        return TextConditioner(step_llm=self._load("step_llm"), llm_tokenizer=self.llm_tokenizer(),
                               clip=self._load("hunyuan_clip"),
                               clip_tokenizer=WordPieceTokenizer.from_dir(self.path / "hunyuan_clip" / "tokenizer"),
                               attention_backend=self.attention_backend, bf16_mask_sum=self.bf16_mask_sum)

    def dit(self) -> nnx.Module:
        return self._load("transformer")

    def vae(self) -> nnx.Module:
        return self._load("vae")


def from_converted(path, *, mesh=None, **kw) -> Models:
    """Restore the four components of a `python -m stepvideo_jax.convert` output."""
    return ConvertedLoader(path, mesh=mesh, **kw).models()


class ReleaseLoader(Loader):
    """The components of a release directory, each converted in memory (defaults: the official
    dtypes): on one device, or with `mesh` tensor by tensor into the mesh's rule shardings
    (`convert.release_restore`), so no converted copy is needed to shard."""

    def __init__(self, path, *, mesh=None, dit_dtype=jnp.bfloat16, vae_dtype=jnp.bfloat16, llm_dtype=jnp.bfloat16,
                 clip_dtype=jnp.float32, attention_backend: str | None = None, bf16_mask_sum: bool = False):
        from stepvideo_jax.convert import dit as dit_convert
        from stepvideo_jax.convert import hunyuan_clip as clip_convert
        from stepvideo_jax.convert import step_llm as llm_convert
        from stepvideo_jax.convert import vae as vae_convert

        self.path = check_checkpoint_dir(path)
        self.mesh = mesh
        self.dit_dtype, self.vae_dtype, self.llm_dtype, self.clip_dtype = dit_dtype, vae_dtype, llm_dtype, clip_dtype
        self.attention_backend, self.bf16_mask_sum = attention_backend, bf16_mask_sum
        self._llm_tokenizer = None
        check_fit(dit_convert.read_config(self.path / "transformer"),
                  llm_convert.read_config(self.path / "step_llm").hidden_size,
                  clip_convert.read_config(self.path / "hunyuan_clip").hidden_size,
                  vae_convert.read_config(self.path / "vae").z_channels)

    def _sharded(self, component: str, dtype) -> nnx.Module:
        from stepvideo_jax.convert.release_restore import load_release_component

        return load_release_component(self.path / component, component, param_dtype=dtype, mesh=self.mesh)

    def text_encoder(self):
        from stepvideo_jax.text.conditioning import TextConditioner
        from stepvideo_jax.text.wordpiece_tokenizer import WordPieceTokenizer

        if self.mesh is not None:
            return TextConditioner(
                step_llm=self._sharded("step_llm", self.llm_dtype), llm_tokenizer=self.llm_tokenizer(),
                clip=self._sharded("hunyuan_clip", self.clip_dtype),
                clip_tokenizer=WordPieceTokenizer.from_dir(self.path / "hunyuan_clip" / "tokenizer"),
                attention_backend=self.attention_backend, bf16_mask_sum=self.bf16_mask_sum)
        return TextConditioner.from_release(self.path, llm_dtype=self.llm_dtype, clip_dtype=self.clip_dtype,
                                            llm_tokenizer=self.llm_tokenizer(),
                                            attention_backend=self.attention_backend,
                                            bf16_mask_sum=self.bf16_mask_sum)

    def llm_tokenizer(self):
        from stepvideo_jax.convert import step_llm as llm_convert
        from stepvideo_jax.text.sentencepiece_tokenizer import StepLLMTokenizer

        if self._llm_tokenizer is None:
            self._llm_tokenizer = StepLLMTokenizer(self.path / llm_convert.COMPONENT / llm_convert.TOKENIZER)
        return self._llm_tokenizer

    def dit(self) -> nnx.Module:
        from stepvideo_jax.convert import dit as dit_convert

        if self.mesh is not None:
            return self._sharded("transformer", self.dit_dtype)
        return dit_convert.load(self.path / "transformer", dtype=self.dit_dtype, param_dtype=self.dit_dtype)

    def vae(self) -> nnx.Module:
        from stepvideo_jax.convert import vae as vae_convert

        if self.mesh is not None:
            return self._sharded("vae", self.vae_dtype)
        return vae_convert.load(self.path / "vae", dtype=self.vae_dtype)


def from_release(path, **kw) -> Models:
    """Convert every component of a release directory in memory (defaults: the official dtypes).

    The configs are read and checked against each other before any weight is loaded.
    """
    return ReleaseLoader(path, **kw).models()


class TinyRandomLoader(Loader):
    """Random-init components from `dims` (keys `dit`, `vae`, `step_llm`, `clip`, each a mapping of
    config fields), with the released tokenizers and their vocabulary sizes. The DiT's caption and
    latent channels follow from the other three unless `dims` sets them. Each component draws from
    its own key (`seed` folded with its index), so it is the same whichever is built first. With
    `mesh` the parameters are placed by the logical-axis rules."""

    KEYS = {"step_llm": 0, "clip": 1, "dit": 2, "vae": 3}

    def __init__(self, dims: Mapping, *, seed: int = 0, mesh=None, dit_dtype=jnp.float32, vae_dtype=jnp.float32,
                 llm_dtype=jnp.float32, clip_dtype=jnp.float32, attention_backend: str | None = None,
                 bf16_mask_sum: bool = False):
        from stepvideo_jax.models.dit import DiTConfig
        from stepvideo_jax.models.hunyuan_clip import HunyuanClipConfig
        from stepvideo_jax.models.step_llm import StepLLMConfig
        from stepvideo_jax.models.vae import VAEConfig
        from stepvideo_jax.text.sentencepiece_tokenizer import StepLLMTokenizer
        from stepvideo_jax.text.wordpiece_tokenizer import WordPieceTokenizer

        self.seed, self.mesh = seed, mesh
        self.dit_dtype, self.vae_dtype, self.llm_dtype, self.clip_dtype = dit_dtype, vae_dtype, llm_dtype, clip_dtype
        self.attention_backend, self.bf16_mask_sum = attention_backend, bf16_mask_sum
        self._llm_tokenizer, self.clip_tokenizer = StepLLMTokenizer(), WordPieceTokenizer.released()
        self.llm_cfg = StepLLMConfig(**{"vocab_size": self._llm_tokenizer.vocab_size, **_fields(dims["step_llm"])})
        self.clip_cfg = HunyuanClipConfig(**{"vocab_size": max(self.clip_tokenizer.vocab.values()) + 1,
                                             **_fields(dims["clip"])})
        self.vae_cfg = VAEConfig(**_fields(dims["vae"]))
        self.dit_cfg = DiTConfig(**{"in_channels": self.vae_cfg.z_channels, "out_channels": self.vae_cfg.z_channels,
                                    "caption_channels": (self.llm_cfg.hidden_size, self.clip_cfg.hidden_size),
                                    **_fields(dims["dit"])})
        check_fit(self.dit_cfg, self.llm_cfg.hidden_size, self.clip_cfg.hidden_size, self.vae_cfg.z_channels)

    def _kw(self, name: str, dtype) -> dict:
        # RBG keys: eager init compiles one sampler per parameter shape, several times faster than threefry
        key = jax.random.fold_in(jax.random.key(self.seed, impl="rbg"), self.KEYS[name])
        return dict(dtype=dtype, param_dtype=dtype, rngs=nnx.Rngs(key))

    def text_encoder(self):
        from stepvideo_jax.models.hunyuan_clip import HunyuanClip
        from stepvideo_jax.models.step_llm import StepLLM
        from stepvideo_jax.text.conditioning import TextConditioner

        place = _placer(self.mesh)
        return TextConditioner(step_llm=place(StepLLM(self.llm_cfg, **self._kw("step_llm", self.llm_dtype))),
                               llm_tokenizer=self._llm_tokenizer,
                               clip=place(HunyuanClip(self.clip_cfg, attention_backend=self.attention_backend,
                                                      **self._kw("clip", self.clip_dtype))),
                               clip_tokenizer=self.clip_tokenizer, attention_backend=self.attention_backend,
                               bf16_mask_sum=self.bf16_mask_sum)

    def llm_tokenizer(self):
        return self._llm_tokenizer

    def dit(self) -> nnx.Module:
        from stepvideo_jax.models.dit import StepVideoDiT

        return _placer(self.mesh)(StepVideoDiT(self.dit_cfg, **self._kw("dit", self.dit_dtype)))

    def vae(self) -> nnx.Module:
        from stepvideo_jax.models.vae import VideoVAE

        return _placer(self.mesh)(VideoVAE(self.vae_cfg, attention_backend=self.attention_backend,
                                           **self._kw("vae", self.vae_dtype)))


def tiny_random(dims: Mapping, *, seed: int = 0, mesh=None, **kw) -> Models:
    """All four models at random init (see `TinyRandomLoader`)."""
    return TinyRandomLoader(dims, seed=seed, mesh=mesh, **kw).models()


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
