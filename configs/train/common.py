"""The fields of every training config (flow matching `configs/train/`, Video-DPO `configs/dpo/`, the
demo's DiT stage `configs/demo/train.py`), with their defaults; a config starts from `base()` and
sets what differs, so every config of the family has the same fields.

Loaded by path from the configs next to it (`config_files.module("train/common.py")`).
"""
import ml_collections


def base() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.objective = "flow_matching"     # or "reflow": step distillation on teacher pairs (configs/distill/)
    c.seed = 0
    c.workdir = ""
    c.compute_dtype = "float32"       # bfloat16 on accelerators: float32 master weights and optimizer state
    c.total_steps = 1000
    c.stop_at_step = 0                # > 0: stop early at this step (the schedule still ends at total_steps)
    c.log_every = 10
    c.eval_every = 0                  # held-out flow-matching loss every N steps (0: never)
    c.eval_size = 0
    c.mesh = dict(data=1, fsdp=-1, sequence=1, tensor=1)

    # DiTConfig fields (`preset="full"`: the official size); init_from: any DiT source of
    # `stepvideo_jax.checkpoints` (release, its transformer/, converted checkpoint, training workdir)
    c.model = ml_collections.ConfigDict(dict(preset="", init_from=""))

    c.data = ml_collections.ConfigDict()
    c.data.path = ""                  # a dataset directory; when empty, `synthetic` is written into the workdir
    c.data.global_batch = 8
    c.data.seed = 0
    c.data.num_threads = 2
    c.data.prefetch = 2
    c.data.check_headers = True       # start-up: every sample file present and its npy headers agree (~0.6 ms
    #                                   a file on local disk); False: presence only (gs:// paths: always)
    c.data.synthetic = None

    c.optim = ml_collections.ConfigDict(dict(
        learning_rate=1e-4, warmup_steps=0, schedule="constant", end_fraction=1.0,
        b1=0.9, b2=0.99, eps=1e-8, weight_decay=0.0, clip_norm=1.0))
    c.step = ml_collections.ConfigDict(dict(
        timestep_distribution="uniform", logit_mean=0.0, logit_std=1.0, timestep_shift=1.0, u_shape_a=5.0,
        cond_dropout=0.1, accum_steps=1, ema_decay=0.0, remat="none", attention_backend=""))
    c.checkpoint = ml_collections.ConfigDict(dict(every=100, keep=3, async_save=True, fallback=True))
    # sample latents of held-out prompts (EMA weights) every `every` steps (0: never); `vae`: a release
    # vae/ directory or checkpoint to also write mp4s (its z_channels must be the DiT's in_channels)
    c.samples = ml_collections.ConfigDict(dict(every=0, count=2, num_steps=10, guidance=5.0, shift=7.0,
                                               seed=0, vae=""))
    c.metrics = ml_collections.ConfigDict(dict(tensorboard=False, peak_flops=0.0))
    c.compile_cache = True         # persistent compilation cache (stepvideo_jax/compile_cache.py)
    c.compile_cache_dir = ""       # "" = $XDG_CACHE_HOME or ~/.cache, /stepvideo_jax/jax_cache
    return c
