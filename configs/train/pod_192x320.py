"""Full-size DiT training on the paper's 192x320 px bucket, 204 frames (latents 36x12x20 = 8,640
tokens), TPU pods. Same recipe as `pod_544x992.py`; short sequences, so no sequence parallelism
and a larger batch, accumulated over 4 micro-batches of one sample per chip (bench/train_memory.py:
4 samples per chip at once need about 162 GiB per chip on v5p, extrapolated).

python launch/entry.py -m stepvideo_jax.train --config configs/train/pod_192x320.py:v5p-128 ...
"""
from stepvideo_jax import config_files

pod_544x992 = config_files.module("train/pod_544x992.py")


def get_config(arg: str = "v5p-256"):
    c = pod_544x992.get_config(arg)
    c.workdir = "/tmp/stepvideo_train_192x320"
    c.mesh = dict(data=1, fsdp=-1, sequence=1, tensor=1)
    c.data.global_batch = {"v5p-128": 256, "v5p-256": 512}[arg]
    c.step.accum_steps = 4                 # micro-batches of one sample per chip (4 per chip does not fit)
    c.step.attention_backend = ""          # platform default (splash on TPU)
    c.optim.learning_rate = 2e-5
    return c
