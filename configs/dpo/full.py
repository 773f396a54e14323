"""Full-size Video-DPO at 544x992 px, 204 frames (latents 36x34x62 = 75,888 tokens), TPU pods.

The policy starts from a flow-matching run (or a release / converted checkpoint), the frozen bf16
reference from the same weights unless `dpo.reference_from` names others; data from
`python -m stepvideo_jax.data.preferences`. Per-chip memory of one step: `bench/dpo_memory.py`.

python launch/entry.py -m stepvideo_jax.train_dpo --config configs/dpo/full.py:v5p-256 \
    --config.dpo.policy_from=/runs/ft --config.data.path=/data/prefs_544x992
"""
from stepvideo_jax import config_files

common = config_files.module("dpo/common.py")
CHIPS = {"v5p-128": 64, "v5p-256": 128}


def get_config(arg: str = "v5p-256"):
    """`arg` is the slice: "v5p-128" (64 chips) or "v5p-256" (128 chips); mesh sequence 4 x fsdp."""
    if arg not in CHIPS:
        raise ValueError(f"unknown slice {arg!r}; choose one of {sorted(CHIPS)}")
    c = common.base()
    c.workdir = "/tmp/stepvideo_dpo_544x992"
    c.compute_dtype = "bfloat16"          # float32 master weights and optimizer state
    c.total_steps = 2_000
    c.mesh = dict(data=1, fsdp=-1, sequence=4, tensor=1)
    c.model.preset = "full"
    c.data.global_batch = CHIPS[arg] // 4  # pairs: one per fsdp group of 4 sequence shards (2 videos)
    c.data.num_threads = 16
    c.dpo.lora_alpha = 64.0               # LoRA needs step.remat = "none" for now (see dpo_step.py)
    c.optim.update(learning_rate=5e-6, warmup_steps=100, b2=0.95)
    c.step.update(timestep_distribution="shifted", timestep_shift=13.0, remat="full", attention_backend="ulysses")
    c.checkpoint.every = 200
    c.metrics.tensorboard = True
    return c
