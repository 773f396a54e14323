r"""Embedded default of the main job: the demo model shipped in the package, no download, CPU.

    python -m stepvideo_jax.generate --config.prompt="a red circle moves to the left"
    python -m stepvideo_jax.generate --config.prompt="一个蓝色的正方形向上移动" --config.seed=7

(this file is the CLI's default `--config`). The demo model (`stepvideo_jax/assets/demo/`) is the
Step-Video architecture at a tiny size trained by this project on the synthetic captioned-motion set
(`stepvideo_jax/data/synthetic_motion.py`; retrain with `configs/demo/train.py`): it follows
prompts "a <colour> <shape> <motion>" with colours red, green, blue, yellow; shapes circle, square,
triangle; motions "moves to the left/right", "moves up/down", "grows", "shrinks" (English or
Chinese), at 17 frames of 32 x 32. Other prompts give whatever the model makes of them, after one
warning line that names the words the demo knows.

Random weights instead: `--config configs/generate/tiny.py`.
"""
import pathlib

import stepvideo_jax
from stepvideo_jax import config_files

common = config_files.module("generate/common.py")
DEMO_CHECKPOINT = pathlib.Path(stepvideo_jax.__file__).resolve().parent / "assets" / "demo"


def get_config():
    c = common.base()
    c.prompt = "a red circle moves to the left"
    c.num_frames = 17              # the demo's training size (one VAE chunk)
    c.height = 32
    c.width = 32
    c.num_steps = 20
    c.guidance_scale = 4.0
    c.time_shift = 3.0
    c.vocabulary = "synthetic_motion"  # other prompts generate with one warning line naming the known words
    c.pos_magic = ""               # the demo is trained on bare captions
    c.neg_magic = ""               # ... and the empty prompt as the unconditional one
    c.checkpoint_dir = str(DEMO_CHECKPOINT)
    c.dtypes.update(dit="float32", vae="float32", step_llm="float32", clip="float32")
    c.output = "outputs/stepvideo_demo.mp4"
    c.denoise_filter = False       # keep the flat colours of the synthetic scenes
    return c
