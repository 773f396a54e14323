"""Tiny CPU Video-DPO run (a minute): a 2-layer DiT on the synthetic preference set, float32.

python -m stepvideo_jax.train_dpo --config configs/dpo/tiny_cpu.py --workdir /tmp/tiny_dpo

The synthetic pairs (`data/preferences.py`): the captioned-motion renders, preferred = the caption's
scene, rejected = the same shape with a wrong colour or motion, encoded by fixed pooling (4 latent
channels, 3 x 4 x 4 latents) and hashed word vectors. The policy and the reference start from the
seed's init (a flow-matching checkpoint would be `dpo.policy_from`).
"""
import ml_collections


def get_config():
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.workdir = "/tmp/stepvideo_dpo_tiny"
    c.compute_dtype = "float32"
    c.total_steps = 60
    c.stop_at_step = 0
    c.log_every = 10
    c.eval_every = 0                  # DPO has no flow-matching held-out loss
    c.eval_size = 0
    c.mesh = dict(data=1, fsdp=1, sequence=1, tensor=1)

    c.model = ml_collections.ConfigDict(dict(
        num_layers=2, num_heads=2, head_dim=32, in_channels=4, out_channels=4,
        caption_channels=(32, 16), rope_splits=(16, 8, 8), init_from=""))

    c.data = ml_collections.ConfigDict()
    c.data.path = ""                  # a stepvideo-preferences-v1 directory, or:
    c.data.global_batch = 8           # pairs per step
    c.data.seed = 0
    c.data.num_threads = 2
    c.data.prefetch = 2
    c.data.check_headers = True       # start-up: every sample file present and its npy headers agree (~0.6 ms
    #                                   a file on local disk); False: presence only (gs:// paths: always)
    c.data.synthetic = ml_collections.ConfigDict(dict(
        num_pairs=32, frames=9, height=32, width=32, channels=4, time_factor=4, space_factor=8,
        text_length=8, clip_length=4, caption_channels=(32, 16), seed=0))

    c.dpo = ml_collections.ConfigDict(dict(
        beta=500.0,                   # Diffusion-DPO used 5000; the paper lowered it
        beta_schedule="constant",     # or "t_squared"
        sft_weight=0.0,               # flow-matching term on the preferred sample
        policy_from="",               # "" seed init | training workdir[:ema] | release transformer/ | converted root
        reference_from="",            # "" = the initial policy
        reference_dtype="bfloat16",   # the frozen reference's storage dtype
        lora_rank=0,                  # > 0: LoRA on the attention projections instead of full fine-tuning
        lora_alpha=16.0,
        lora_targets=("attn1.q", "attn1.k", "attn1.v", "attn1.o", "attn2.q", "attn2.k", "attn2.v", "attn2.o")))

    c.optim = ml_collections.ConfigDict(dict(
        learning_rate=1e-4, warmup_steps=5, schedule="constant", end_fraction=1.0,
        b1=0.9, b2=0.99, eps=1e-8, weight_decay=0.0, clip_norm=1.0))

    c.step = ml_collections.ConfigDict(dict(
        timestep_distribution="uniform", logit_mean=0.0, logit_std=1.0, timestep_shift=1.0,
        cond_dropout=0.0, accum_steps=1, ema_decay=0.0, remat="none", attention_backend="xla"))

    c.checkpoint = ml_collections.ConfigDict(dict(every=30, keep=2, async_save=True, fallback=True))
    c.metrics = ml_collections.ConfigDict(dict(tensorboard=False, peak_flops=0.0))
    c.compile_cache = True         # persistent compilation cache (stepvideo_jax/compile_cache.py)
    c.compile_cache_dir = ""       # "" = $XDG_CACHE_HOME or ~/.cache, /stepvideo_jax/jax_cache
    return c
