r"""The reflow-distilled demo ("demo Turbo"): the demo's text encoders and VAE with the student DiT
(`stepvideo_jax/assets/demo_turbo/`, 4 Euler steps instead of 20, no CFG). CPU, no download.

    python -m stepvideo_jax.generate --config configs/generate/demo_turbo.py \
        --config.prompt="a red circle moves to the left"
    python -m stepvideo_jax.generate --config configs/generate/demo_turbo.py --config.num_steps=2 ...

The student was distilled from the shipped demo DiT (20 steps, CFG 4, shift 3) by reflow on 1,536
teacher pairs (`configs/distill/demo.py`); it learnt the teacher's guided trajectories, so it samples
without classifier-free guidance (one DiT row per video, not two). Measured: docs/turbo.md.
"""
import pathlib

import stepvideo_jax
from stepvideo_jax import config_files

demo = config_files.module("generate/demo.py")
STUDENT = pathlib.Path(stepvideo_jax.__file__).resolve().parent / "assets" / "demo_turbo"


def get_config():
    c = demo.get_config()
    c.dit_from = str(STUDENT)
    c.num_steps = 4
    c.guidance_scale = 1.0         # <= 1: no CFG (the student distilled the teacher's CFG-4 trajectories)
    c.time_shift = 1.0
    c.output = "outputs/stepvideo_demo_turbo.mp4"
    return c
