"""Staged generation: the text encoders encode every prompt, are released, then the DiT and VAE load.

The staged run must give exactly the all-loaded run's latents and frames (tiny random models, and a
converted checkpoint named by a relative path), the encoders must really be gone (weak references
dead, live device bytes down by at least their parameters) before the DiT loads, and the eval runner
must encode every pending prompt before the first denoising and still resume.
"""
import gc
import weakref

import jax
import numpy as np
import pytest
from flax import nnx

from stepvideo_jax import checkpoints
from stepvideo_jax.convert import conversion
from stepvideo_jax.models.dit import StepVideoDiT
from stepvideo_jax.sampling import eval_set, generation
from stepvideo_jax.sampling import pipeline as P
from stepvideo_jax.sampling import video_io
from stepvideo_jax.text import conditioning
from tests.fixtures import fixture_dir, load_config
from tests.test_pipeline import SETTINGS, SIZE, TOY, toy_decode, toy_text_encoder

pytestmark = pytest.mark.e2e

# the tiny config at one VAE chunk and two steps: every stage runs, compiles stay short
SMALL = dict(num_frames=17, height=32, width=48, num_steps=2, progress=False, denoise_filter=False,
             save_latents=True)


def tiny_config(output, **overrides):
    output.parent.mkdir(parents=True, exist_ok=True)
    return load_config("configs/generate/tiny.py", **{**SMALL, "output": str(output), **overrides})


def settled_live_bytes() -> int:
    """Live device bytes once unreachable garbage (earlier tests' models in reference cycles) is
    collected: otherwise a collection during a measured load lowers the count, and a test's
    memory figures depend on which tests ran before it."""
    gc.collect()
    return generation.live_bytes()


def run_cli(config) -> dict:
    settled_live_bytes()
    return generation.run(config, generation.resolve(config))


def outputs(summary) -> tuple[np.ndarray, np.ndarray]:
    """(latents, decoded mp4 frames) of a one-video summary."""
    return np.load(summary["latents"][0]), video_io.read_mp4(summary["files"][0])[0]


# --- the pipeline with and without its text encoder (toy components) -----------------------------


def test_precomputed_conditioning_gives_the_same_videos():
    pipe = P.TextToVideo(encode_text=toy_text_encoder, dit=StepVideoDiT(TOY, rngs=nnx.Rngs(0)), decode=toy_decode)
    prompts = ["a cat", "a dog"]
    cond = pipe.encode(prompts, cfg=SETTINGS.cfg)
    assert all(isinstance(v, np.ndarray) for v in cond.values())
    assert {k: v.shape[0] for k, v in cond.items()} == {"y": 4, "y_mask": 4, "clip": 4}  # cond + uncond rows
    textless = P.TextToVideo(encode_text=None, dit=StepVideoDiT(TOY, rngs=nnx.Rngs(0)), decode=toy_decode)
    got = textless(prompts, size=SIZE, settings=SETTINGS, seeds=[1, 2], cond=cond)
    want = pipe(prompts, size=SIZE, settings=SETTINGS, seeds=[1, 2])
    np.testing.assert_array_equal(got.latents, want.latents)
    np.testing.assert_array_equal(np.stack(got.frames), np.stack(want.frames))
    assert set(got.timings) == {"denoise", "decode"}


def test_textless_pipeline_rejects_missing_or_mismatched_conditioning():
    textless = P.TextToVideo(encode_text=None, dit=StepVideoDiT(TOY, rngs=nnx.Rngs(0)), decode=toy_decode)
    with pytest.raises(ValueError, match="holds no text encoder: pass the prompts' conditioning as cond="):
        textless(["a cat"], size=SIZE, settings=SETTINGS, seeds=[1])
    cond = P.encode_prompts(toy_text_encoder, ["a cat"], cfg=False)
    with pytest.raises(ValueError, match="2 rows expected"):
        textless(["a cat"], size=SIZE, settings=SETTINGS, seeds=[1], cond=cond)
    with pytest.raises(ValueError, match=r"cond has keys \['y'\]"):
        textless(["a cat"], size=SIZE, settings=SETTINGS, seeds=[1], cond={"y": cond["y"]})


# --- the CLI's staged flow on the tiny random models ----------------------------------------------


@pytest.mark.slow
def test_staged_run_equals_the_all_loaded_run(tmp_path, compile_cache):
    staged = run_cli(tiny_config(tmp_path / "staged" / "v.mp4"))
    loaded = run_cli(tiny_config(tmp_path / "loaded" / "v.mp4", release_text_encoders=False))
    for got, want in zip(outputs(staged), outputs(loaded)):
        np.testing.assert_array_equal(got, want)
    assert list(staged["timings"]) == ["load text encoders", "tokenize+encode", "release", "load dit+vae",
                                       "denoise", "decode", "write"]
    assert list(loaded["timings"]) == ["load", "tokenize+encode", "denoise", "decode", "write"]
    memory = staged["live_bytes"]
    assert list(memory) == ["text encoders loaded", "prompts encoded", "text encoders released", "dit+vae loaded",
                            "generation"]
    # what the all-loaded run holds beyond the DiT and VAE is the encoders' parameters
    encoder_bytes = loaded["live_bytes"]["all models loaded"] - memory["dit+vae loaded"]
    assert encoder_bytes > 1e6
    assert memory["text encoders loaded"] - memory["text encoders released"] >= encoder_bytes


def test_text_encoders_are_released_before_the_dit_loads(tmp_path, monkeypatch):
    config = tiny_config(tmp_path / "v.mp4")
    job = generation.resolve(config)
    refs, param_bytes = [], []
    init = conditioning.TextConditioner.__init__

    def recording_init(self, *, step_llm, clip, **kw):
        init(self, step_llm=step_llm, clip=clip, **kw)
        params = jax.tree.leaves((self.llm_state, self.clip_state))
        refs.extend(weakref.ref(x) for x in (self, step_llm, clip, *params))
        param_bytes.append(sum(a.nbytes for a in params))

    monkeypatch.setattr(conditioning.TextConditioner, "__init__", recording_init)
    before = settled_live_bytes()
    memory = {}
    conds, seconds, _ = generation.encode_stage(config, job.models, [["a cat"], ["a dog"]],
                                              job.settings, memory)
    assert len(param_bytes) == 1 and len(refs) > 10
    assert [r for r in refs if r() is not None] == [], "something still holds the text encoders"
    assert memory["text encoders loaded"] - before >= param_bytes[0]
    assert memory["text encoders loaded"] - memory["text encoders released"] >= param_bytes[0]
    assert generation.live_bytes() < before + param_bytes[0] / 10
    assert len(conds) == len(seconds) == 2
    for cond in conds:
        assert all(isinstance(v, np.ndarray) and v.shape[0] == 2 for v in cond.values())


def test_staged_run_from_a_relative_converted_checkpoint(tmp_path, monkeypatch, compile_cache):
    """Orbax refuses relative paths: the restore must resolve `checkpoint_dir=ckpt` itself."""

    release = fixture_dir("release_layout") / "stepvideo-t2v"
    conversion.convert_release(release, tmp_path / "ckpt")
    monkeypatch.chdir(tmp_path)
    before = settled_live_bytes()   # arrays other tests of this process still hold
    staged = run_cli(tiny_config(tmp_path / "staged" / "v.mp4", checkpoint_dir="ckpt"))
    loaded = run_cli(tiny_config(tmp_path / "loaded" / "v.mp4", checkpoint_dir=str(release),
                                 release_text_encoders=False))
    for got, want in zip(outputs(staged), outputs(loaded)):
        np.testing.assert_array_equal(got, want)
    memory = {k: v - before for k, v in staged["live_bytes"].items()}
    assert memory["text encoders released"] < memory["text encoders loaded"] / 10, memory


# --- the eval runner --------------------------------------------------------------------------------


def test_eval_encodes_every_prompt_before_denoising_and_resumes(tmp_path, monkeypatch, compile_cache):
    config = tiny_config(tmp_path / "unused.mp4", save_latents=False)
    events, text_refs = [], []
    build_loader, run_batch = generation.build_loader, generation.generate

    class Recording(checkpoints.Loader):
        def __init__(self, inner):
            self.inner, self.mesh, self.dit_cfg, self.vae_cfg = inner, inner.mesh, inner.dit_cfg, inner.vae_cfg

        def text_encoder(self):
            events.append("load text")
            text = self.inner.text_encoder()
            text_refs.append(weakref.ref(text))

            def encode(rows):
                events.append(("encode", rows[0]))
                return text(rows)

            return encode

        def dit(self):
            events.append(("load dit", sum(r() is not None for r in text_refs)))
            return self.inner.dit()

        def vae(self):
            events.append("load vae")
            return self.inner.vae()

    def recording_generate(config, job, pipe, cond=None):
        events.append(("generate", job.prompts[0], pipe.encode_text is None and cond is not None))
        return run_batch(config, job, pipe, cond=cond)

    monkeypatch.setattr(generation, "build_loader", lambda *a: Recording(build_loader(*a)))
    monkeypatch.setattr(generation, "generate", recording_generate)
    out, pos = tmp_path / "eval", config.pos_magic

    eval_set.run_eval(config, ["a cat", "a dog", "a bird"], out, limit=2)
    assert events == ["load text", ("encode", "a cat" + pos), ("encode", "a dog" + pos), ("load dit", 0),
                      "load vae", ("generate", "a cat", True), ("generate", "a dog", True)]

    events.clear()
    manifest = eval_set.run_eval(config, ["a cat", "a dog", "a bird"], out)
    assert events == ["load text", ("encode", "a bird" + pos), ("load dit", 0), "load vae",
                      ("generate", "a bird", True)]
    assert sorted(manifest["videos"]) == ["000.mp4", "001.mp4", "002.mp4"]
    assert set(manifest["videos"]["002.mp4"]["timings"]) == {"tokenize+encode", "denoise", "decode", "write"}

    events.clear()
    eval_set.run_eval(config, ["a cat", "a dog", "a bird"], out)
    assert events == [], "nothing pending: nothing is loaded"
