r"""Reflow step distillation of the demo model (`training/reflow.py`), CPU, minutes.

    # 1. teacher pairs: the shipped demo (20 steps, CFG 4, shift 3) on the 48 training scenes x EN/ZH
    #    captions x 16 seeds = 1,536 pairs
    python -m stepvideo_jax.data.reflow_job --config configs/generate/demo.py \
        --prompts_file captions.txt --seeds_per_prompt 16 --seed 100000 --batch_size 32 --out /tmp/reflow_pairs
    # 2. the student
    python -m stepvideo_jax.train --config configs/distill/demo.py --workdir /tmp/demo_student \
        --config.data.path=/tmp/reflow_pairs

(`captions.txt`: `Scene.caption(lang)` of `data.synthetic_motion.TRAIN_SCENES` x ("en", "zh"), one a line;
docs/turbo.md has the script). The student starts from the shipped demo DiT (`model.init_from`) and
samples in 4 or 2 Euler steps (`configs/generate/demo_turbo.py`).
"""
import pathlib

import stepvideo_jax
from stepvideo_jax import config_files

common = config_files.module("distill/common.py")
DEMO_CHECKPOINT = pathlib.Path(stepvideo_jax.__file__).resolve().parent / "assets" / "demo"


def get_config():
    c = common.base()
    c.workdir = "/tmp/stepvideo_demo_student"
    c.total_steps = 2000
    c.log_every = 100
    c.eval_every = 250                # held-out reflow loss: fixed pairs, fixed t ~ U(0, 1)
    c.eval_size = 32
    c.mesh = dict(data=-1, fsdp=1, sequence=1, tensor=1)
    c.model.init_from = str(DEMO_CHECKPOINT)   # the teacher
    c.data.update(global_batch=16, prefetch=4)
    c.optim.update(learning_rate=2e-4, warmup_steps=50, schedule="cosine", end_fraction=0.05)
    c.step.attention_backend = "xla"
    c.checkpoint.update(every=500, keep=1, async_save=False)
    return c
