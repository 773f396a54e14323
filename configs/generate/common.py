"""The fields of every generation config (`python -m stepvideo_jax.generate` and `generate_eval`),
with the official release's settings as defaults; a config starts from `base()` and sets what
differs, so every config of the family has the same fields.
"""
import ml_collections

POS_MAGIC = "超高清、HDR 视频、环境光、杜比全景声、画面稳定、流畅动作、逼真的细节、专业级构图、超现实主义、自然、生动、超细节、清晰。"
NEG_MAGIC = "画面暗、低分辨率、不良手、文本、缺少手指、多余的手指、裁剪、低质量、颗粒状、签名、水印、用户名、模糊。"


def base() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.prompt = ""
    c.prompts = ()                 # a batch: overrides `prompt` when not empty
    c.seed = 1234                  # prompt i of a batch uses seed + i
    c.num_frames = 204             # multiple of 17
    c.height = 544                 # multiple of 16
    c.width = 992                  # multiple of 16
    c.num_steps = 50
    c.guidance_scale = 9.0         # <= 1 turns classifier-free guidance off
    c.time_shift = 13.0
    c.vocabulary = ""              # prompts the model was trained on (demo/vocabulary.py): outside them, a warning
    c.cfg_schedule = "constant"    # or "decaying": cfg_t = max(cfg - 9 t (cfg - 1), 1), the Turbo paper's
    c.pos_magic = POS_MAGIC
    c.neg_magic = NEG_MAGIC

    c.checkpoint_dir = ""          # a release directory (or its Hugging Face repo id) or a converted checkpoint
    c.dit_from = ""                # another DiT (e.g. a distilled student) instead of checkpoint_dir's
    c.ti2v = False                 # image to video: a first frame per prompt (configs/generate/ti2v.py)
    c.image = ""                   # TI2V: the first frame (PNG, JPEG, ...; other modes converted to RGB)
    c.motion_score = ml_collections.config_dict.placeholder(float)   # TI2V: finite, more motion when higher (ti2v.py: 5)
    c.tiny = None                  # instead of checkpoint_dir: tiny random models (configs/generate/tiny.py)
    c.dtypes = ml_collections.ConfigDict(dict(dit="bfloat16", vae="bfloat16", step_llm="bfloat16",
                                              clip="float32"))   # the official deployment's
    c.weights = "bf16"             # DiT + Step-LLM block linears: bf16 | int8 | fp8 (docs/quantization.md)
    c.offload = "none"             # "blocks": DiT + Step-LLM layers in host memory, one layer ahead (docs/offload.md)
    c.cfg_sequential = False       # CFG cond and uncond rows one after the other (half the activations)
    c.mesh = ""                    # "": one device; else e.g. "fsdp=-1", "sequence=2,tensor=4"
    c.attention_backend = ""       # "": the platform default (see models/attention.py)
    c.bf16_mask_sum = False        # reproduce the official bf16 text-mask rounding
    c.release_text_encoders = True  # encode all prompts, free the text encoders, then load the DiT

    c.output = "outputs/stepvideo.mp4"   # a batch writes <stem>_<i>.mp4
    c.save_latents = False         # also write <stem>.npy with the final latents (1, f, c, h, w)
    c.crop_540p = True             # the official crop2standard540p (a no-op below 540 x 960)
    c.denoise_filter = True        # the official ffmpeg atadenoise filter
    c.progress = True
    c.compile_cache = True         # persistent compilation cache (stepvideo_jax/compile_cache.py)
    c.compile_cache_dir = ""       # "" = $XDG_CACHE_HOME or ~/.cache, /stepvideo_jax/jax_cache
    return c
