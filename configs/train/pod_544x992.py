"""Full-size DiT training at 544x992 px, 204 frames (latents 36x34x62 = 75,888 tokens), TPU pods.

Init from the official release (converted in memory); data from `stepvideo_jax.data.precompute`.

python launch/entry.py -m stepvideo_jax.train --config configs/train/pod_544x992.py:v5p-256 \
    --config.model.init_from=/path/to/stepvideo-t2v/transformer --config.data.path=/data/latents_544x992
"""
import ml_collections


def get_config(arg: str = "v5p-256"):
    """`arg` is the slice: "v5p-128" (64 chips) or "v5p-256" (128 chips); mesh sequence 4 x fsdp."""
    chips = {"v5p-128": 64, "v5p-256": 128}
    if arg not in chips:
        raise ValueError(f"unknown slice {arg!r}; choose one of {sorted(chips)}")
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.workdir = "/tmp/stepvideo_train_544x992"
    c.compute_dtype = "bfloat16"          # float32 master weights and optimizer state
    c.total_steps = 20_000
    c.stop_at_step = 0
    c.log_every = 10
    c.eval_every = 500
    c.eval_size = 4
    c.mesh = dict(data=1, fsdp=-1, sequence=4, tensor=1)
    c.model = ml_collections.ConfigDict(dict(preset="full", init_from=""))
    c.data = ml_collections.ConfigDict()
    c.data.path = ""
    c.data.global_batch = chips[arg] // 4  # one sample per fsdp group of 4 sequence shards
    c.data.seed = 0
    c.data.num_threads = 16
    c.data.prefetch = 2
    c.data.check_headers = True       # start-up: every sample file present and its npy headers agree (~0.6 ms
    #                                   a file on local disk); False: presence only (gs:// paths: always)
    c.data.synthetic = None
    c.optim = ml_collections.ConfigDict(dict(
        learning_rate=1e-5, warmup_steps=500, schedule="constant", end_fraction=1.0,
        b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.01, clip_norm=1.0))
    c.step = ml_collections.ConfigDict(dict(
        timestep_distribution="shifted", logit_mean=0.0, logit_std=1.0, timestep_shift=13.0,
        cond_dropout=0.1, accum_steps=1, ema_decay=0.9999, remat="full", attention_backend="ulysses"))
    c.checkpoint = ml_collections.ConfigDict(dict(every=500, keep=3, async_save=True, fallback=True))
    c.metrics = ml_collections.ConfigDict(dict(tensorboard=True, peak_flops=0.0))
    c.compile_cache = True         # persistent compilation cache (stepvideo_jax/compile_cache.py)
    c.compile_cache_dir = ""       # "" = $XDG_CACHE_HOME or ~/.cache, /stepvideo_jax/jax_cache
    return c
