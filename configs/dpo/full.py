"""Full-size Video-DPO at 544x992 px, 204 frames (latents 36x34x62 = 75,888 tokens), TPU pods.

The policy starts from a flow-matching run (or a release / converted checkpoint), the frozen bf16
reference from the same weights unless `dpo.reference_from` names others; data from
`python -m stepvideo_jax.data.preferences`. Per-chip memory of one step: `bench/dpo_memory.py`.

python launch/entry.py -m stepvideo_jax.train_dpo --config configs/dpo/full.py:v5p-256 \
    --config.dpo.policy_from=/runs/ft --config.data.path=/data/prefs_544x992
"""
import ml_collections


def get_config(arg: str = "v5p-256"):
    """`arg` is the slice: "v5p-128" (64 chips) or "v5p-256" (128 chips); mesh sequence 4 x fsdp."""
    chips = {"v5p-128": 64, "v5p-256": 128}
    if arg not in chips:
        raise ValueError(f"unknown slice {arg!r}; choose one of {sorted(chips)}")
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.workdir = "/tmp/stepvideo_dpo_544x992"
    c.compute_dtype = "bfloat16"          # float32 master weights and optimizer state
    c.total_steps = 2_000
    c.stop_at_step = 0
    c.log_every = 10
    c.eval_every = 0
    c.eval_size = 0
    c.mesh = dict(data=1, fsdp=-1, sequence=4, tensor=1)
    c.model = ml_collections.ConfigDict(dict(preset="full", init_from=""))
    c.data = ml_collections.ConfigDict()
    c.data.path = ""
    c.data.global_batch = chips[arg] // 4  # pairs: one per fsdp group of 4 sequence shards (2 videos)
    c.data.seed = 0
    c.data.num_threads = 16
    c.data.prefetch = 2
    c.data.check_headers = True       # start-up: every sample file present and its npy headers agree (~0.6 ms
    #                                   a file on local disk); False: presence only (gs:// paths: always)
    c.data.synthetic = None
    c.dpo = ml_collections.ConfigDict(dict(
        beta=500.0, beta_schedule="constant", sft_weight=0.0,
        policy_from="", reference_from="", reference_dtype="bfloat16",
        lora_rank=0, lora_alpha=64.0,       # LoRA needs step.remat = "none" for now (see dpo_step.py)
        lora_targets=("attn1.q", "attn1.k", "attn1.v", "attn1.o", "attn2.q", "attn2.k", "attn2.v", "attn2.o")))
    c.optim = ml_collections.ConfigDict(dict(
        learning_rate=5e-6, warmup_steps=100, schedule="constant", end_fraction=1.0,
        b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.0, clip_norm=1.0))
    c.step = ml_collections.ConfigDict(dict(
        timestep_distribution="shifted", logit_mean=0.0, logit_std=1.0, timestep_shift=13.0,
        cond_dropout=0.0, accum_steps=1, ema_decay=0.0, remat="full", attention_backend="ulysses"))
    c.checkpoint = ml_collections.ConfigDict(dict(every=200, keep=3, async_save=True, fallback=True))
    c.metrics = ml_collections.ConfigDict(dict(tensorboard=True, peak_flops=0.0))
    c.compile_cache = True         # persistent compilation cache (stepvideo_jax/compile_cache.py)
    c.compile_cache_dir = ""       # "" = $XDG_CACHE_HOME or ~/.cache, /stepvideo_jax/jax_cache
    return c
