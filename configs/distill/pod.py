r"""Full-size reflow step distillation (Step-Video-T2V-Turbo's recipe) at 544x992 px, 204 frames,
TPU pods: the layout of `configs/train/pod_544x992.py` (mesh sequence 4 x fsdp, one pair per fsdp
group of 4 sequence shards, remat full, bf16 compute with float32 master weights).

    # teacher pairs (the base model at 50 steps, CFG 9, shift 13), sharded over the pod's mesh
    python launch/entry.py -m stepvideo_jax.data.reflow_job --config configs/generate/release.py \
        --config.checkpoint_dir=/path/to/stepvideo-t2v --config.mesh=sequence=4,fsdp=-1 \
        --prompts_file prompts.txt --seeds_per_prompt 1 --out /data/reflow_544x992
    # the student, initialised from the teacher
    python launch/entry.py -m stepvideo_jax.train --config configs/distill/pod.py:v5p-256 \
        --config.model.init_from=/path/to/stepvideo-t2v/transformer --config.data.path=/data/reflow_544x992

The paper distils on ~95,000 teacher videos of a curated prompt distribution; the student samples
with `configs/generate/release.py:turbo` settings (15 steps, CFG 5, shift 17, or the decaying CFG:
`--config.cfg_schedule=decaying`).
"""
from stepvideo_jax import config_files

common = config_files.module("distill/common.py")
pod_544x992 = config_files.module("train/pod_544x992.py")


def get_config(arg: str = "v5p-256"):
    """`arg` is the slice: "v5p-128" (64 chips) or "v5p-256" (128 chips); mesh sequence 4 x fsdp."""
    if arg not in pod_544x992.CHIPS:
        raise ValueError(f"unknown slice {arg!r}; choose one of {sorted(pod_544x992.CHIPS)}")
    c = common.base()
    c.workdir = "/tmp/stepvideo_distill_544x992"
    c.compute_dtype = "bfloat16"          # float32 master weights and optimizer state
    c.total_steps = 6_000                 # ~95k pairs: 6k steps of 16 (v5p-128) or 32 (v5p-256) per batch
    c.eval_every = 500
    c.eval_size = 4
    c.mesh = dict(data=1, fsdp=-1, sequence=4, tensor=1)
    c.model.preset = "full"
    c.data.global_batch = pod_544x992.CHIPS[arg] // 4  # one pair per fsdp group of 4 sequence shards
    c.data.num_threads = 16
    c.optim.update(learning_rate=1e-5, warmup_steps=250, b2=0.95, weight_decay=0.01)
    c.step.update(ema_decay=0.9999, remat="full", attention_backend="ulysses")
    c.checkpoint.every = 500
    c.metrics.tensorboard = True
    return c
