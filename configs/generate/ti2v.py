r"""Step-Video-TI2V (text + first-frame image to video), the official CLI defaults: 102 frames at
544 x 992, 50 steps, CFG 9, time shift 7, motion score 5, TI2V's own magic prompts.

    python -m stepvideo_jax.generate --config configs/generate/ti2v.py \
        --config.checkpoint_dir=stepfun-ai/stepvideo-ti2v --config.image=first.png \
        --config.motion_score=5 --config.prompt="..."

`checkpoint_dir`: the TI2V release directory, its converted checkpoint, or the hub repo id. The image
is scaled to cover height x width and centre-cropped; the first decoded frame is generated from it,
not copied (docs/ti2v.md).
"""
import ml_collections


def get_config():
    c = ml_collections.ConfigDict()
    c.prompt = ""
    c.prompts = ()                 # a batch (all with the same image): overrides `prompt` when not empty
    c.image = ""                   # required: the first frame (PNG, JPEG, ...; other modes converted to RGB)
    c.motion_score = 5.0           # more motion when higher; finite
    c.seed = 1234                  # prompt i of a batch uses seed + i (initial noise and image posterior)
    c.num_frames = 102             # multiple of 17
    c.height = 544                 # multiple of 16
    c.width = 992                  # multiple of 16
    c.num_steps = 50
    c.guidance_scale = 9.0         # <= 1 turns classifier-free guidance off
    c.time_shift = 7.0
    c.pos_magic = ("画面中的主体动作表现生动自然、画面流畅、生动细节、光线统一柔和、超真实动态捕捉、大师级运镜、"
                   "整体不变形、超高清、画面稳定、逼真的细节、专业级构图、超细节、清晰。")
    c.neg_magic = ("动画、模糊、变形、毁容、低质量、拼贴、粒状、标志、抽象、插图、计算机生成、扭曲、动作不流畅、"
                   "面部有褶皱、表情僵硬、畸形手指")

    c.checkpoint_dir = ""          # required: release directory, converted checkpoint or stepfun-ai/stepvideo-ti2v
    c.dtypes = ml_collections.ConfigDict(dict(dit="bfloat16", vae="bfloat16", step_llm="bfloat16",
                                              clip="float32"))   # the official deployment's
    c.mesh = ""                    # "": one device; else e.g. "fsdp=-1", "sequence=2,tensor=4" (not a release dir)
    c.attention_backend = ""       # "": the platform default (see models/attention.py)
    c.bf16_mask_sum = False        # reproduce the official bf16 text-mask rounding
    c.release_text_encoders = True  # encode all prompts, free the text encoders, then load the DiT

    c.output = "outputs/stepvideo_ti2v.mp4"   # a batch writes <stem>_<i>.mp4
    c.save_latents = False         # also write <stem>.npy with the final latents (1, f, c, h, w)
    c.crop_540p = True             # the official crop2standard540p
    c.denoise_filter = True        # the official ffmpeg atadenoise filter
    c.progress = True
    return c
