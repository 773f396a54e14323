r"""Embedded default of the main job: all four models tiny and random, no download, ~1 min on 2 CPUs.

    python -m stepvideo_jax.generate --config.prompt="A red panda climbs a snowy pine tree."

(this file is the CLI's default `--config`). The video is noise-like: the weights are random. It
exercises the whole real path: both released tokenizers, Step-LLM + Hunyuan-CLIP, the DiT with CFG
and the flow-matching sampler, the VAE decode with a chunk boundary, post-processing, H.264 mp4.
"""
import ml_collections


def get_config():
    c = ml_collections.ConfigDict()
    c.prompt = "A red panda climbs a snowy pine tree, cinematic lighting."
    c.prompts = ()                 # a batch: overrides `prompt` when not empty
    c.seed = 1234                  # prompt i of a batch uses seed + i
    c.num_frames = 34              # multiple of 17 (2 VAE chunks: one blended boundary)
    c.height = 64                  # multiple of 16
    c.width = 112                  # multiple of 16
    c.num_steps = 4
    c.guidance_scale = 9.0         # <= 1 turns classifier-free guidance off
    c.time_shift = 13.0
    c.pos_magic = "超高清、HDR 视频、环境光、杜比全景声、画面稳定、流畅动作、逼真的细节、专业级构图、超现实主义、自然、生动、超细节、清晰。"
    c.neg_magic = "画面暗、低分辨率、不良手、文本、缺少手指、多余的手指、裁剪、低质量、颗粒状、签名、水印、用户名、模糊。"

    c.checkpoint_dir = ""          # empty: the tiny random models below
    c.tiny = ml_collections.ConfigDict(dict(
        seed=0,
        step_llm=dict(hidden_size=64, num_heads=4, num_kv_groups=2, num_layers=2, ffn_hidden_size=160),
        clip=dict(hidden_size=64, num_heads=4, num_layers=2, intermediate_size=128),
        vae=dict(z_channels=4, encoder_stem=32, encoder_widths=(64, 32, 64, 64),
                 decoder_widths=(32, 64, 32, 32)),
        dit=dict(num_layers=2, num_heads=2, head_dim=64, rope_splits=(32, 16, 16)),
    ))
    c.dtypes = ml_collections.ConfigDict(dict(dit="float32", vae="float32", step_llm="float32",
                                              clip="float32"))
    c.mesh = ""                    # "": one device; else e.g. "fsdp=-1", "sequence=2,tensor=4"
    c.attention_backend = ""       # "": the platform default (see models/attention.py)
    c.bf16_mask_sum = False        # reproduce the official bf16 text-mask rounding
    c.release_text_encoders = True  # encode all prompts, free the text encoders, then load the DiT

    c.output = "outputs/stepvideo_tiny.mp4"   # a batch writes <stem>_<i>.mp4
    c.save_latents = False         # also write <stem>.npy with the final latents (1, f, c, h, w)
    c.crop_540p = True             # the official crop2standard540p (a no-op below 540 x 960)
    c.denoise_filter = True        # the official ffmpeg atadenoise filter
    c.progress = True
    c.compile_cache = True         # persistent compilation cache (stepvideo_jax/compile_cache.py)
    c.compile_cache_dir = ""       # "" = $XDG_CACHE_HOME or ~/.cache, /stepvideo_jax/jax_cache
    return c
