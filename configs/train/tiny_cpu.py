"""Tiny CPU run (minutes): a 2-layer DiT on a synthetic dataset, float32, one device.

python -m stepvideo_jax.train --config configs/train/tiny_cpu.py --workdir /tmp/tiny_run
"""
import ml_collections

from stepvideo_jax import config_files

common = config_files.module("train/common.py")


def get_config():
    c = common.base()
    c.workdir = "/tmp/stepvideo_train_tiny"
    c.total_steps = 600
    c.log_every = 25
    c.eval_every = 50
    c.eval_size = 8
    c.mesh = dict(data=1, fsdp=1, sequence=1, tensor=1)
    c.model = ml_collections.ConfigDict(dict(
        preset="", num_layers=2, num_heads=1, head_dim=128, in_channels=4, out_channels=4,
        caption_channels=(32, 16), init_from=""))   # head_dim 128: the official RoPE split (64, 32, 32)
    c.data.synthetic = ml_collections.ConfigDict(dict(
        num_samples=8, buckets=((2, 4, 4),), channels=4, text_length=8, clip_length=4,
        caption_channels=(32, 16), seed=0))
    c.optim.update(learning_rate=3e-3, warmup_steps=20, schedule="cosine", end_fraction=0.1)
    c.step.update(ema_decay=0.99, attention_backend="xla")
    c.checkpoint.update(keep=2)
    return c
