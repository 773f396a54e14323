"""Tiny CPU run (minutes): a 2-layer DiT on a synthetic dataset, float32, one device.

python -m stepvideo_jax.train --config configs/train/tiny_cpu.py --workdir /tmp/tiny_run
"""
import ml_collections


def get_config():
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.workdir = "/tmp/stepvideo_train_tiny"
    c.compute_dtype = "float32"
    c.total_steps = 600
    c.stop_at_step = 0                # > 0: stop early at this step (the schedule still ends at total_steps)
    c.log_every = 25
    c.eval_every = 50
    c.eval_size = 8
    c.mesh = dict(data=1, fsdp=1, sequence=1, tensor=1)

    c.model = ml_collections.ConfigDict(dict(
        num_layers=2, num_heads=1, head_dim=128, in_channels=4, out_channels=4,
        caption_channels=(32, 16), init_from=""))   # head_dim 128: the official RoPE split (64, 32, 32)

    c.data = ml_collections.ConfigDict()
    c.data.path = ""
    c.data.global_batch = 8
    c.data.seed = 0
    c.data.num_threads = 2
    c.data.prefetch = 2
    c.data.check_headers = True       # start-up: every sample file present and its npy headers agree (~0.6 ms
    #                                   a file on local disk); False: presence only (gs:// paths: always)
    c.data.synthetic = ml_collections.ConfigDict(dict(
        num_samples=8, buckets=((2, 4, 4),), channels=4, text_length=8, clip_length=4,
        caption_channels=(32, 16), seed=0))

    c.optim = ml_collections.ConfigDict(dict(
        learning_rate=3e-3, warmup_steps=20, schedule="cosine", end_fraction=0.1,
        b1=0.9, b2=0.99, eps=1e-8, weight_decay=0.0, clip_norm=1.0))

    c.step = ml_collections.ConfigDict(dict(
        timestep_distribution="uniform", logit_mean=0.0, logit_std=1.0, timestep_shift=1.0,
        cond_dropout=0.1, accum_steps=1, ema_decay=0.99, remat="none", attention_backend="xla"))

    c.checkpoint = ml_collections.ConfigDict(dict(every=100, keep=2, async_save=True, fallback=True))
    # sample latents of held-out prompts (EMA weights) every `every` steps; `vae`: a release vae/
    # directory to also write mp4s (its z_channels must be the DiT's in_channels)
    c.samples = ml_collections.ConfigDict(dict(every=0, count=2, num_steps=10, guidance=5.0, shift=7.0,
                                               seed=0, vae=""))
    c.metrics = ml_collections.ConfigDict(dict(tensorboard=False, peak_flops=0.0))
    c.compile_cache = True         # persistent compilation cache (stepvideo_jax/compile_cache.py)
    c.compile_cache_dir = ""       # "" = $XDG_CACHE_HOME or ~/.cache, /stepvideo_jax/jax_cache
    return c
