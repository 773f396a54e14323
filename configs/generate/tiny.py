r"""All four models tiny and random, no download, ~1 min on 2 CPUs.

    python -m stepvideo_jax.generate --config configs/generate/tiny.py \
        --config.prompt="A red panda climbs a snowy pine tree."

The video is noise-like: the weights are random. It exercises the whole real path: both released
tokenizers, Step-LLM + Hunyuan-CLIP, the DiT with CFG and the flow-matching sampler, the VAE decode
with a chunk boundary, post-processing, H.264 mp4.
"""
import ml_collections

from stepvideo_jax import config_files

common = config_files.module("generate/common.py")


def get_config():
    c = common.base()
    c.prompt = "A red panda climbs a snowy pine tree, cinematic lighting."
    c.num_frames = 34              # multiple of 17 (2 VAE chunks: one blended boundary)
    c.height = 64                  # multiple of 16
    c.width = 112                  # multiple of 16
    c.num_steps = 4
    c.tiny = ml_collections.ConfigDict(dict(
        seed=0,
        step_llm=dict(hidden_size=64, num_heads=4, num_kv_groups=2, num_layers=2, ffn_hidden_size=160),
        clip=dict(hidden_size=64, num_heads=4, num_layers=2, intermediate_size=128),
        vae=dict(z_channels=4, encoder_stem=32, encoder_widths=(64, 32, 64, 64),
                 decoder_widths=(32, 64, 32, 32)),
        dit=dict(num_layers=2, num_heads=2, head_dim=64, rope_splits=(32, 16, 16)),
    ))
    c.dtypes.update(dit="float32", vae="float32", step_llm="float32", clip="float32")
    c.output = "outputs/stepvideo_tiny.mp4"
    return c
