r"""The image-to-video demo: the demo's text encoders and VAE with the TI2V demo DiT
(`stepvideo_jax/assets/demo_ti2v/`: the demo DiT fine-tuned with Step-Video-TI2V's first-frame
condition, built by `python -m stepvideo_jax.demo.build --config configs/demo/ti2v.py`). CPU, no download.

    python -m stepvideo_jax.generate --config configs/generate/demo_ti2v.py
    python -m stepvideo_jax.generate --config configs/generate/demo_ti2v.py \
        --config.image=first.png --config.prompt="a green circle moves up"

The default image (`assets/demo_ti2v/first_frame.png`, 32 x 32) is frame 0 of a render of the default
prompt's scene, a combination the demo never trained on (`demo.build.default_first_frame`). Any image
works: it is scaled to cover 32 x 32 and centre-cropped as for the full model. Measured: docs/ti2v.md.
"""
import pathlib

import stepvideo_jax
from stepvideo_jax import config_files

demo = config_files.module("generate/demo.py")
TI2V_DIT = pathlib.Path(stepvideo_jax.__file__).resolve().parent / "assets" / "demo_ti2v"


def get_config():
    c = demo.get_config()
    c.ti2v = True
    c.dit_from = str(TI2V_DIT)
    c.prompt = "a blue square moves up"    # configs/demo/ti2v.py image_caption: the default image's scene
    c.image = str(TI2V_DIT / "first_frame.png")
    c.motion_score = 5.0           # the score it was fine-tuned with (the synthetic set has one speed)
    c.output = "outputs/stepvideo_demo_ti2v.mp4"
    return c
