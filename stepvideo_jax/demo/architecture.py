"""The demo model's four architectures, read from a demo config (`configs/demo/train.py`).

The DiT reads the text encoders' widths (`caption_channels`) and writes the VAE's latent channels,
so those fields follow from the other three configs and are not set in the demo config. The text
encoders use the released tokenizers, so their vocabulary sizes are the released ones.
"""
from __future__ import annotations

from flax import nnx

from stepvideo_jax.convert.config_records import config_from_values
from stepvideo_jax.models.dit import DiTConfig
from stepvideo_jax.models.hunyuan_clip import HunyuanClip, HunyuanClipConfig
from stepvideo_jax.models.step_llm import StepLLM, StepLLMConfig
from stepvideo_jax.models.vae import VAEConfig
from stepvideo_jax.text.conditioning import LLM_LENGTH, TextConditioner
from stepvideo_jax.text.sentencepiece_tokenizer import StepLLMTokenizer
from stepvideo_jax.text.wordpiece_tokenizer import WordPieceTokenizer
from stepvideo_jax.training.settings import dit_config as train_dit_config


def vae_config(config) -> VAEConfig:
    return config_from_values(VAEConfig, config.vae.to_dict())


def dit_model_config(config) -> dict:
    """`config.dit_train.model` (the trainer's `config.model`) with the channels the other
    components imply, as a plain dict."""
    model = dict(config.dit_train.model.to_dict())
    z = vae_config(config).z_channels
    model.update(in_channels=z, out_channels=z,
                 caption_channels=(config.step_llm.hidden_size, config.clip.hidden_size))
    return model


def dit_config(config) -> DiTConfig:
    return train_dit_config(dit_model_config(config))


def text_encoders(config) -> tuple[StepLLM, HunyuanClip]:
    """Step-LLM and Hunyuan-CLIP at their deterministic random init (`config.text_seed`, drawn in
    this order from one `nnx.Rngs`), float32."""
    llm_cfg = config_from_values(StepLLMConfig, {"vocab_size": StepLLMTokenizer().vocab_size,
                                                 **config.step_llm.to_dict()})
    clip_vocab = max(WordPieceTokenizer.released().vocab.values()) + 1
    clip_cfg = config_from_values(HunyuanClipConfig, {"vocab_size": clip_vocab, **config.clip.to_dict()})
    rngs = nnx.Rngs(config.text_seed)
    return StepLLM(llm_cfg, rngs=rngs), HunyuanClip(clip_cfg, rngs=rngs)


def conditioner(step_llm: StepLLM, clip: HunyuanClip, *, llm_length: int = LLM_LENGTH) -> TextConditioner:
    """prompts -> {"y", "y_mask", "clip"} with the released tokenizers.

    A shorter `llm_length` than the pipeline's 320 gives the same DiT output for prompts that fit
    (the DiT masks Step-LLM padding keys out); training uses it to skip ~300 padding keys per row.
    CLIP keeps its 77 positions: the DiT attends to all of them, padding included.
    """
    return TextConditioner(step_llm=step_llm, llm_tokenizer=StepLLMTokenizer(), clip=clip,
                           clip_tokenizer=WordPieceTokenizer.released(), llm_length=llm_length)
