r"""The TI2V demo: the shipped demo DiT (`stepvideo_jax/assets/demo`) fine-tuned with the first-frame
condition on the demo's synthetic set, by the project's flow-matching trainer.

    python -m stepvideo_jax.demo.build --config configs/demo/ti2v.py --workdir /tmp/stepvideo_demo_ti2v

Stages (`demo.build.build_ti2v`; each resumes or is skipped when its output exists in the workdir):
1. latents: the training scenes encoded by the base demo's VAE and text encoders (as `train.py`);
2. init: the base DiT as a TI2V DiT (`demo.build.ti2v_from_t2v`: patch embedding 2c wide with zero
   condition rows, motion-score MLP output zero), so training starts from exactly the T2V demo;
3. DiT: flow matching (`dit_train`) with each sample's own first latent frame as the condition and
   `ti2v.motion_score` as the score;
4. export: only the TI2V transformer (bf16) to `<workdir>/demo_ti2v` (the VAE and text encoders stay
   the base demo's; run it with `--config.dit_from=<workdir>/demo_ti2v`, docs/ti2v.md), with
   `first_frame.png` (`image_caption` rendered with `image_seed`);
5. evaluation: held-out scenes x languages x `eval.seeds`, each with frame 0 of a render of the scene
   as the image, against a random TI2V DiT.
"""
import pathlib

import stepvideo_jax
from stepvideo_jax import config_files

demo_train = config_files.module("demo/train.py")
BASE = pathlib.Path(stepvideo_jax.__file__).resolve().parent / "assets" / "demo"


def get_config():
    c = demo_train.get_config()
    c.workdir = "/tmp/stepvideo_demo_ti2v"
    c.vae_phases = ()              # the base demo's VAE, not retrained
    # image_caption/image_seed: first_frame.png written beside the DiT (a held-out scene)
    c.ti2v = dict(base=str(BASE), motion_score=5.0, image_caption="a blue square moves up", image_seed=1234)
    d = c.dit_train
    d.total_steps = 3000
    d.eval_every = 500
    d.optim.update(learning_rate=5e-4, warmup_steps=50, schedule="cosine", end_fraction=0.05)
    d.checkpoint.update(every=500, keep=1, async_save=False)
    c.eval.update(seeds=(1000, 1001, 1002))
    return c
