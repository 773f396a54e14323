"""The fields of every reflow step-distillation config (`training/reflow.py`): the training family's
(`configs/train/common.py`) with the recipe's defaults: `objective = "reflow"`, U-shaped timesteps
(density ∝ exp(a t) + exp(a (1 - t)), a = 5), 10 % conditioning dropout to the teacher's negative
prompt, and `model.init_from` (the teacher) required by the configs below.

Loaded by path from the configs next to it (`config_files.module("distill/common.py")`).
"""
from stepvideo_jax import config_files

train_common = config_files.module("train/common.py")


def base():
    c = train_common.base()
    c.objective = "reflow"
    c.step.update(timestep_distribution="u_shaped", u_shape_a=5.0, cond_dropout=0.1)
    return c
