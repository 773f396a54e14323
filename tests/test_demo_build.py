"""The demo builds (`demo.build.build`, `build_ti2v`) end to end at a few steps per stage, from the
shipped configs: every stage runs, the outputs are complete, and a second run resumes (no stage that
finished is run again, its time and curves are kept)."""
import json

import jax
import pytest

from configs.demo import ti2v as ti2v_config
from configs.demo import train as train_config
from stepvideo_jax import checkpoints
from stepvideo_jax.demo import build

VAE_STEPS, DIT_STEPS = 2, 3


def shrink(config):
    """The shipped config at a few steps and a handful of videos (sizes and architectures kept; one
    VAE phase: each compiles its own step)."""
    config.vae_phases = tuple(config.vae_phases)[:1]
    for phase in config.vae_phases:
        config[phase].update(steps=VAE_STEPS, pool=2, batch=1, log_every=1, warmup_steps=0)
    config.latents.renders_per_scene = 1
    d = config.dit_train
    d.update(total_steps=DIT_STEPS, log_every=1, eval_every=0)
    d.data.global_batch = jax.device_count()     # the demo's mesh puts the batch on every device
    d.optim.warmup_steps = 0
    d.checkpoint.every = DIT_STEPS
    config.sample.num_steps = 2
    config.eval.update(seeds=(1000,), languages=("en",), max_scenes=1, batch=4)
    config.compile_cache = False
    return config


def run(fn, config, workdir, export_to=""):
    lines = []
    summary = fn(config, workdir, export_to=export_to, printer=lines.append)
    return summary, [ln for ln in lines if ln.startswith("== stage ") and not ln.endswith(" s")]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """A demo built once: (config, workdir, exported checkpoint, summary, stages started)."""
    root = tmp_path_factory.mktemp("demo_build")
    config = shrink(train_config.get_config())
    summary, started = run(build.build, config, root / "work", str(root / "demo"))
    return config, root / "work", root / "demo", summary, started


@pytest.mark.slow
def test_the_demo_build_runs_every_stage_and_resumes(demo):
    config, work, out, summary, started = demo
    stages = [*config.vae_phases, "latents", "dit", "export", "evaluate"]
    assert started == [f"== stage {s}" for s in stages]
    assert set(summary["stage_seconds"]) == set(stages)
    for component in ("transformer", "vae", "step_llm", "hunyuan_clip"):
        assert checkpoints.is_converted(out) and (out / component).is_dir(), component
    curves = json.loads((out / "curves.json").read_text())
    assert [len(curves[p]) for p in config.vae_phases] == [VAE_STEPS] * len(config.vae_phases)
    assert len(curves["dit"]) == DIT_STEPS
    recorded = json.loads((out / "summary.json").read_text())
    assert recorded["accuracy"] == summary["accuracy"]
    assert {"vae_reconstruction", "demo/held_out", "random_dit/held_out"} <= set(recorded["accuracy"])

    again, started = run(build.build, config, work)
    assert started == ["== stage export", "== stage evaluate"]      # the trained stages are not run again
    for s in stages[:-2]:
        assert again["stage_seconds"][s] == summary["stage_seconds"][s], s
    assert again["accuracy"] == summary["accuracy"]                 # same weights, same videos
    assert json.loads((work / "curves.json").read_text()) == curves


@pytest.mark.slow
def test_the_ti2v_build_fine_tunes_a_base_demo_and_resumes(demo, tmp_path):
    config = shrink(ti2v_config.get_config())
    config.ti2v.base = str(demo[2])
    work = tmp_path / "work"
    summary, started = run(build.build_ti2v, config, work)
    assert started == [f"== stage {s}" for s in ("latents", "dit", "export", "evaluate")]
    out = work / "demo_ti2v"
    assert checkpoints.dit_config(out).ti2v and (out / build.FIRST_FRAME).exists()
    assert set(summary["by_seed"]) == set(summary["accuracy"]) and "demo_ti2v/held_out" in summary["accuracy"]
    again, started = run(build.build_ti2v, config, work)
    assert started == ["== stage export", "== stage evaluate"]
    assert again["stage_seconds"]["dit"] == summary["stage_seconds"]["dit"]
