"""Tiny CPU Video-DPO run (a minute): a 2-layer DiT on the synthetic preference set, float32.

python -m stepvideo_jax.train_dpo --config configs/dpo/tiny_cpu.py --workdir /tmp/tiny_dpo

The synthetic pairs (`data/preferences.py`): the captioned-motion renders, preferred = the caption's
scene, rejected = the same shape with a wrong colour or motion, encoded by fixed pooling (4 latent
channels, 3 x 4 x 4 latents) and hashed word vectors. The policy and the reference start from the
seed's init (a flow-matching checkpoint would be `dpo.policy_from`).
"""
import ml_collections

from stepvideo_jax import config_files

common = config_files.module("dpo/common.py")


def get_config():
    c = common.base()
    c.workdir = "/tmp/stepvideo_dpo_tiny"
    c.total_steps = 60
    c.mesh = dict(data=1, fsdp=1, sequence=1, tensor=1)
    c.model = ml_collections.ConfigDict(dict(
        preset="", num_layers=2, num_heads=2, head_dim=32, in_channels=4, out_channels=4,
        caption_channels=(32, 16), rope_splits=(16, 8, 8), init_from=""))
    c.data.global_batch = 8           # pairs per step
    c.data.synthetic = ml_collections.ConfigDict(dict(
        num_pairs=32, frames=9, height=32, width=32, channels=4, time_factor=4, space_factor=8,
        text_length=8, clip_length=4, caption_channels=(32, 16), seed=0))
    c.optim.update(learning_rate=1e-4, warmup_steps=5)
    c.step.attention_backend = "xla"
    c.checkpoint.update(every=30, keep=2)
    return c
