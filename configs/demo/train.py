r"""The demo model: all four Step-Video components at a tiny size, trained on the synthetic
captioned-motion set (`data/synthetic_motion.py`) by the project's own stack, on CPU.

    python -m stepvideo_jax.demo.build --config configs/demo/train.py --workdir /tmp/stepvideo_demo

Stages (each resumes or is skipped when its output exists in the workdir):
1. text encoders: Step-LLM and Hunyuan-CLIP frozen at their deterministic random init (`text_seed`),
   with the released tokenizers; they are shipped with the weights, so nothing depends on RNG details;
2. VAE: the Video-VAE v2 architecture trained on renders of the training scenes, reconstruction
   (MSE) + a small KL term (`training/vae_train.py`), the phases of `vae_phases` in order;
3. latents: posterior moments of `latents.renders_per_scene` renders of every training scene with
   both captions (EN, ZH) encoded, in the `stepvideo-latents-v1` format;
4. DiT: flow matching with the project's trainer (`training/loop.py`), config `dit_train` below;
5. export: the four components in the converted-checkpoint format (`convert/orbax_io.py`), bf16,
   to `<workdir>/demo` (`--export_to` also writes them elsewhere, e.g. `stepvideo_jax/assets/demo`),
   and the loss curves as JSON next to them.

32 x 32 pixels, 17 frames: 3 x 4 x 4 latents of `vae.z_channels` channels (three VAE levels: 8x
spatial, where the full model's four give 16x; 17 -> 3 temporal as the full model). With four levels
(2 x 2 latents, the first demo) the latent grid cannot hold an object's outline and every shape
decoded as a round blob. The VAE's GroupNorms use ONE group (`vae.groups`): GroupNorm is per frame,
and with as many groups as channels it normalises each channel's amplitude away, so colour survives
only as signs. The VAE loss weights the object's pixels x 5 (`foreground_weight` 4): the object is a
few percent of the frame, and with the plain MSE yellow decoded as red.
Held-out (colour, shape, motion) combinations
(`synthetic_motion.HELD_OUT`) are never rendered for training.
"""
import ml_collections

from stepvideo_jax import config_files

train_common = config_files.module("train/common.py")


def get_config():
    c = ml_collections.ConfigDict()
    c.workdir = "/tmp/stepvideo_demo"
    c.seed = 0
    c.video = ml_collections.ConfigDict(dict(frames=17, height=32, width=32))

    # the four architectures; the DiT's caption/latent channels follow from the other three
    c.text_seed = 0
    c.step_llm = ml_collections.ConfigDict(dict(hidden_size=32, num_heads=4, num_kv_groups=2, num_layers=1,
                                                ffn_hidden_size=64))
    c.clip = ml_collections.ConfigDict(dict(hidden_size=32, num_heads=4, num_layers=1, intermediate_size=64))
    c.vae = ml_collections.ConfigDict(dict(
        z_channels=8, encoder_stem=8, encoder_widths=(8, 8, 32), decoder_widths=(8, 8, 32),
        encoder_temporal_levels=(0, 1), decoder_temporal_levels=(1, 2), num_res_blocks=1, groups=1))

    # the VAE: whole 32 x 32 renders of the training scenes; `vae_phases` run in order, each from the last
    # (the later ones on fresh renders)
    c.vae_phases = ("vae_train", "vae_finetune", "vae_finetune2")
    c.vae_train = ml_collections.ConfigDict(dict(
        steps=600, batch=4, render_size=32, crop=0, learning_rate=2e-3, warmup_steps=20, schedule="cosine",
        end_fraction=0.05, clip_norm=1.0, kl_weight=1e-4, foreground_weight=4.0, foreground_threshold=0.1, pool=192,
        seed=0, log_every=25))
    c.vae_finetune = ml_collections.ConfigDict(dict(
        steps=400, batch=4, render_size=32, crop=0, learning_rate=1e-3, warmup_steps=0, schedule="cosine",
        end_fraction=0.05, clip_norm=1.0, kl_weight=1e-4, foreground_weight=4.0, foreground_threshold=0.1, pool=192,
        seed=2, log_every=25))
    c.vae_finetune2 = ml_collections.ConfigDict(dict(
        steps=400, batch=4, render_size=32, crop=0, learning_rate=1e-3, warmup_steps=0, schedule="cosine",
        end_fraction=0.05, clip_norm=1.0, kl_weight=1e-4, foreground_weight=4.0, foreground_threshold=0.1, pool=192,
        seed=3, log_every=25))

    # llm_length: Step-LLM positions stored per caption (captions fit; see `demo.architecture.conditioner`)
    c.latents = ml_collections.ConfigDict(dict(renders_per_scene=8, seed=1, llm_length=24))

    d = train_common.base()
    d.workdir = ""                    # set by the build: <workdir>/dit
    d.total_steps = 16000
    d.log_every = 100
    d.eval_every = 500
    d.eval_size = 16
    d.mesh = dict(data=-1, fsdp=1, sequence=1, tensor=1)
    d.model = ml_collections.ConfigDict(dict(preset="", num_layers=4, num_heads=2, head_dim=32,
                                             rope_splits=(16, 8, 8), init_from=""))
    d.data.update(global_batch=16, prefetch=4)
    d.optim.update(learning_rate=1e-3, warmup_steps=50, schedule="cosine", end_fraction=0.05)
    d.step.attention_backend = "xla"
    d.checkpoint.update(every=1000, keep=1, async_save=False)
    c.dit_train = d

    # how the shipped model samples (also the evaluation's settings)
    c.sample = ml_collections.ConfigDict(dict(num_steps=20, guidance_scale=4.0, time_shift=3.0))
    # evaluation of the build: held-out scenes x languages x seeds, and every train_stride-th
    # training scene (0: none); the same for a randomly initialised DiT (chance level)
    c.eval = ml_collections.ConfigDict(dict(seeds=(1000, 1001, 1002), languages=("en", "zh"), train_stride=0,
                                            max_scenes=0, batch=48, random_dit_seed=1))
    c.compile_cache = True         # persistent compilation cache (stepvideo_jax/compile_cache.py)
    c.compile_cache_dir = ""       # "" = $XDG_CACHE_HOME or ~/.cache, /stepvideo_jax/jax_cache
    return c
