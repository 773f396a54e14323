r"""Step-Video-TI2V (text + first-frame image to video), the official CLI defaults: 102 frames at
544 x 992, 50 steps, CFG 9, time shift 7, motion score 5, TI2V's own magic prompts.

    python -m stepvideo_jax.generate --config configs/generate/ti2v.py \
        --config.checkpoint_dir=stepfun-ai/stepvideo-ti2v --config.image=first.png \
        --config.motion_score=5 --config.prompt="..."

`checkpoint_dir`: the TI2V release directory, its converted checkpoint, or the hub repo id. The image
is scaled to cover height x width and centre-cropped; the first decoded frame is generated from it,
not copied (docs/ti2v.md). A batch of prompts shares the one image (seed + i: initial noise and
image posterior).
"""
from stepvideo_jax import config_files

common = config_files.module("generate/common.py")


def get_config():
    c = common.base()
    c.ti2v = True
    c.image = ""                   # required: the first frame
    c.motion_score = 5.0
    c.num_frames = 102             # multiple of 17
    c.time_shift = 7.0
    c.pos_magic = ("画面中的主体动作表现生动自然、画面流畅、生动细节、光线统一柔和、超真实动态捕捉、大师级运镜、"
                   "整体不变形、超高清、画面稳定、逼真的细节、专业级构图、超细节、清晰。")
    c.neg_magic = ("动画、模糊、变形、毁容、低质量、拼贴、粒状、标志、抽象、插图、计算机生成、扭曲、动作不流畅、"
                   "面部有褶皱、表情僵硬、畸形手指")
    c.output = "outputs/stepvideo_ti2v.mp4"
    return c
