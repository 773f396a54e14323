r"""Step-Video-T2V as released, with the official recommended settings of each model:

    base   Step-Video-T2V: 50 steps, CFG 9, time shift 13 (the default variant)
    turbo  Step-Video-T2V-Turbo: 15 steps (10-15), CFG 5, time shift 17

    python -m stepvideo_jax.generate --config configs/generate/release.py \
        --config.checkpoint_dir=/path/to/stepvideo-t2v --config.prompt="..."
    python -m stepvideo_jax.generate --config configs/generate/release.py:turbo \
        --config.checkpoint_dir=/path/to/stepvideo-t2v-turbo --config.prompt="..."

`checkpoint_dir` is a release directory as published (`transformer/`, `vae/`, `step_llm/`,
`hunyuan_clip/`); 204 frames at 544 x 992, cropped to 540 x 960 as the official pipeline does.
"""
from stepvideo_jax import config_files

common = config_files.module("generate/common.py")

VARIANTS = {
    "base": dict(num_steps=50, guidance_scale=9.0, time_shift=13.0, output="outputs/stepvideo.mp4"),
    "turbo": dict(num_steps=15, guidance_scale=5.0, time_shift=17.0, output="outputs/stepvideo_turbo.mp4"),
}


def get_config(arg: str = "base"):
    if arg not in VARIANTS:
        raise ValueError(f"unknown release variant {arg!r}; choose one of {sorted(VARIANTS)}")
    c = common.base()
    c.update(VARIANTS[arg])
    return c
