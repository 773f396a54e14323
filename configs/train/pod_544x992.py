"""Full-size DiT training at 544x992 px, 204 frames (latents 36x34x62 = 75,888 tokens), TPU pods.

Init from the official release (converted in memory); data from `stepvideo_jax.data.precompute`.

python launch/entry.py -m stepvideo_jax.train --config configs/train/pod_544x992.py:v5p-256 \
    --config.model.init_from=/path/to/stepvideo-t2v/transformer --config.data.path=/data/latents_544x992
"""
from stepvideo_jax import config_files

common = config_files.module("train/common.py")
CHIPS = {"v5p-128": 64, "v5p-256": 128}


def get_config(arg: str = "v5p-256"):
    """`arg` is the slice: "v5p-128" (64 chips) or "v5p-256" (128 chips); mesh sequence 4 x fsdp."""
    if arg not in CHIPS:
        raise ValueError(f"unknown slice {arg!r}; choose one of {sorted(CHIPS)}")
    c = common.base()
    c.workdir = "/tmp/stepvideo_train_544x992"
    c.compute_dtype = "bfloat16"          # float32 master weights and optimizer state
    c.total_steps = 20_000
    c.eval_every = 500
    c.eval_size = 4
    c.mesh = dict(data=1, fsdp=-1, sequence=4, tensor=1)
    c.model.preset = "full"
    c.data.global_batch = CHIPS[arg] // 4  # one sample per fsdp group of 4 sequence shards
    c.data.num_threads = 16
    c.optim.update(learning_rate=1e-5, warmup_steps=500, b2=0.95, weight_decay=0.01)
    c.step.update(timestep_distribution="shifted", timestep_shift=13.0, ema_decay=0.9999, remat="full",
                  attention_backend="ulysses")
    c.checkpoint.every = 500
    c.metrics.tensorboard = True
    return c
