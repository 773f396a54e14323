"""Tiny random models for a text-to-video run, the jitted VAE decoder of a run, and the pipeline
over a VAE module (`text_to_video`).

Checkpoints (release directories and converted checkpoints) load through
`stepvideo_jax.checkpoints` (`checkpoints.loader`); this module adds the tiny random set, which needs
no download: all four models at random init with mutually consistent widths (DiT caption channels =
[Step-LLM width, CLIP width], DiT channels = VAE latent channels) and the released tokenizers shipped
in the package, so the vocabularies are the released ones. Both are `checkpoints.Loader`s: each
component is built on demand, so a run can encode its prompts, release the text encoders and only
then build the DiT.
"""
from __future__ import annotations

from typing import Callable, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from stepvideo_jax.checkpoints import Loader, Models, check_fit
from stepvideo_jax.convert.config_records import config_from_values
from stepvideo_jax.models import offload as offload_mod
from stepvideo_jax.models import quant
from stepvideo_jax.models.dit import DiTConfig, StepVideoDiT
from stepvideo_jax.models.hunyuan_clip import HunyuanClip, HunyuanClipConfig
from stepvideo_jax.models.step_llm import StepLLM, StepLLMConfig
from stepvideo_jax.models.vae import VAEConfig, VideoVAE
from stepvideo_jax.parallel.mesh import shard_model
from stepvideo_jax.sampling.image_condition import encode_condition
from stepvideo_jax.sampling.pipeline import TextToVideo
from stepvideo_jax.text.conditioning import TextConditioner
from stepvideo_jax.text.sentencepiece_tokenizer import StepLLMTokenizer
from stepvideo_jax.text.wordpiece_tokenizer import WordPieceTokenizer


def vae_decoder(vae: nnx.Module, **decode_kw) -> Callable[[jax.Array], jax.Array]:
    """latents (b, f, c, h, w) -> video (b, F, 3, H, W) float32, jitted once per latent shape."""
    graphdef, state = nnx.split(vae)

    @jax.jit
    def decode(state, latents):
        return nnx.merge(graphdef, state).decode(latents, **decode_kw).astype(jnp.float32)

    return lambda latents: decode(state, latents)


def vae_image_encoder(vae: nnx.Module) -> Callable[[jax.Array, jax.Array], jax.Array]:
    """(video (1, 1, 3, h, w), posterior noise (1, 1, z, h/s, w/s)) -> the posterior sample, float32
    (`image_condition.encode_condition`, the TI2V image condition), jitted once per size."""
    graphdef, state = nnx.split(vae)

    @jax.jit
    def encode(state, video, noise):
        return encode_condition(nnx.merge(graphdef, state), video, noise)

    return lambda video, noise: encode(state, video, noise)


def text_to_video(encode_text, dit: nnx.Module, vae: VideoVAE, *, stream_frames: int | None = None,
                  **kw) -> TextToVideo:
    """The pipeline of `dit` over `vae`: its jitted decoder (`stream_frames` per decoder slab; None:
    the decoder's default), its image encoder where the DiT is TI2V, and its spatial factor. `kw`:
    the rest of `TextToVideo`'s options."""
    decode_kw = {} if stream_frames is None else {"stream_frames": stream_frames}
    return TextToVideo(encode_text=encode_text, dit=dit, decode=vae_decoder(vae, **decode_kw),
                       encode_image=vae_image_encoder(vae) if dit.cfg.ti2v else None,
                       spatial_factor=vae.cfg.spatial_factor, **kw)


class TinyRandomLoader(Loader):
    """Random-init components from `dims` (keys `dit`, `vae`, `step_llm`, `clip`, each a mapping of
    config fields), with the released tokenizers and their vocabulary sizes. The DiT's caption and
    latent channels follow from the other three unless `dims` sets them. Each component draws from
    its own key (`seed` folded with its index), so it is the same whichever is built first. With
    `mesh` the parameters are placed by the logical-axis rules; `offload="blocks"` then moves the
    DiT's and Step-LLM's stacked layers to host memory (`models.offload`)."""

    KEYS = {"step_llm": 0, "clip": 1, "dit": 2, "vae": 3}

    def __init__(self, dims: Mapping, *, seed: int = 0, mesh=None, dit_dtype=jnp.float32, vae_dtype=jnp.float32,
                 llm_dtype=jnp.float32, clip_dtype=jnp.float32, attention_backend: str | None = None,
                 bf16_mask_sum: bool = False, weights: str | None = None, offload: str = "none"):
        self.seed, self.mesh = seed, mesh
        self.offload = offload_mod.check_offload(offload)
        if self.offload:
            offload_mod.check_mesh(mesh)
        self.weights = "bf16" if weights is None else weights
        quant.check_scheme(self.weights)
        self.dit_dtype, self.vae_dtype, self.llm_dtype, self.clip_dtype = dit_dtype, vae_dtype, llm_dtype, clip_dtype
        self.attention_backend, self.bf16_mask_sum = attention_backend, bf16_mask_sum
        self._llm_tokenizer, self.clip_tokenizer = StepLLMTokenizer(), WordPieceTokenizer.released()
        self.llm_cfg = config_from_values(StepLLMConfig, {"vocab_size": self._llm_tokenizer.vocab_size,
                                                          **dims["step_llm"]})
        self.clip_cfg = config_from_values(HunyuanClipConfig, {
            "vocab_size": max(self.clip_tokenizer.vocab.values()) + 1, **dims["clip"]})
        self.vae_cfg = config_from_values(VAEConfig, dims["vae"])
        self.dit_cfg = config_from_values(DiTConfig, {
            "in_channels": self.vae_cfg.z_channels, "out_channels": self.vae_cfg.z_channels,
            "caption_channels": (self.llm_cfg.hidden_size, self.clip_cfg.hidden_size), **dims["dit"]})
        check_fit(self.dit_cfg, self.llm_cfg.hidden_size, self.clip_cfg.hidden_size, self.vae_cfg.z_channels)

    def _kw(self, name: str, dtype) -> dict:
        # RBG keys: eager init compiles one sampler per parameter shape, several times faster than threefry
        key = jax.random.fold_in(jax.random.key(self.seed, impl="rbg"), self.KEYS[name])
        return dict(dtype=dtype, param_dtype=dtype, rngs=nnx.Rngs(key))

    def text_encoder(self):
        place = _placer(self.mesh)
        llm = quant.quantize(StepLLM(self.llm_cfg, **self._kw("step_llm", self.llm_dtype)), self.weights)
        return TextConditioner(step_llm=self._offload(place(llm)),
                               llm_tokenizer=self._llm_tokenizer,
                               clip=place(HunyuanClip(self.clip_cfg, attention_backend=self.attention_backend,
                                                      **self._kw("clip", self.clip_dtype))),
                               clip_tokenizer=self.clip_tokenizer, attention_backend=self.attention_backend,
                               bf16_mask_sum=self.bf16_mask_sum)

    def llm_tokenizer(self):
        return self._llm_tokenizer

    def dit(self) -> nnx.Module:
        dit = StepVideoDiT(self.dit_cfg, **self._kw("dit", self.dit_dtype))
        return self._offload(_placer(self.mesh)(quant.quantize(dit, self.weights)))

    def _offload(self, model: nnx.Module) -> nnx.Module:
        return offload_mod.offload(model) if self.offload else model

    def vae(self) -> nnx.Module:
        return _placer(self.mesh)(VideoVAE(self.vae_cfg, attention_backend=self.attention_backend,
                                           **self._kw("vae", self.vae_dtype)))


def tiny_random(dims: Mapping, *, seed: int = 0, mesh=None, **kw) -> Models:
    """All four models at random init (see `TinyRandomLoader`)."""
    return TinyRandomLoader(dims, seed=seed, mesh=mesh, **kw).models()


def _placer(mesh):
    if mesh is None:
        return lambda module: module
    return lambda module: shard_model(module, mesh)

