"""A training config is read once (`training.settings.resolve`): plain frozen settings, and every bad
value named before anything is made on disk."""
import dataclasses

import pytest

from stepvideo_jax import checkpoints
from stepvideo_jax.convert import dit as dit_convert
from stepvideo_jax.training.settings import TrainSettings, resolve
from tests.fixtures import fixture_dir, load_config


def tiny(**overrides):
    return load_config("configs/train/tiny_cpu.py", **overrides)


def test_settings_are_plain_and_frozen(tmp_path):
    config = tiny(stop_at_step=3)
    s = resolve(config, tmp_path / "run")
    assert isinstance(s, TrainSettings)
    assert s.workdir == tmp_path / "run" and not (tmp_path / "run").exists()   # nothing made yet
    assert (s.stop, s.total_steps) == (3, config.total_steps)
    assert s.optim.total_steps == config.total_steps and s.optim.learning_rate == config.optim.learning_rate
    assert s.data.synthetic == config.data.synthetic.to_dict()
    assert s.samples.every == config.samples.every and s.logging.log_every == config.log_every
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.seed = 1


@pytest.mark.parametrize("override,message", [
    ({"compute_dtype": "float8"}, r"compute_dtype='float8': choose one of \['bfloat16', 'float32'\]"),
    ({"optim.schedule": "linear"}, r"unknown learning-rate schedule 'linear'; choose one of"),
    ({"optim.warmup_steps": 10**6}, r"need 0 <= warmup_steps < total_steps"),
    ({"mesh.pipeline": 2}, r"unknown mesh axes \['pipeline'\]"),
    ({"model.depth": 2}, r"config.model has unknown keys \['depth'\]"),
    ({"samples.every": 5, "samples.count": 0}, r"samples.count \(0\) and samples.num_steps \(\d+\) must be >= 1"),
    ({"step.remat": "all"}, r"unknown remat policy 'all'; choose one of"),
    ({"step.timestep_distribution": "beta"}, r"unknown timestep distribution 'beta'; choose one of"),
    ({"step.timestep_distribution": "shifted", "step.timestep_shift": 0.0}, r"shifted timesteps need shift > 0"),
    ({"step.accum_steps": 0}, r"accum_steps 0 must be >= 1"),
])

def test_bad_values_are_named_before_anything_is_made(tmp_path, override, message):
    with pytest.raises(ValueError, match=message):
        resolve(tiny(**override), tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_accumulation_must_divide_the_batch(tmp_path):
    config = tiny()
    n = config.data.global_batch + 1
    with pytest.raises(ValueError, match=rf"step.accum_steps {n} must divide data.global_batch {n - 1}"):
        resolve(tiny(**{"step.accum_steps": n}), tmp_path / "run")


def test_the_model_of_init_from_wins_over_the_config_fields(tmp_path):
    """`model.init_from`'s DiT config (read without weights) is the run's model, whatever the
    config's own model fields say."""
    source = fixture_dir("release_layout") / "stepvideo-t2v" / "transformer"
    want = dit_convert.read_config(source)
    s = resolve(tiny(**{"model.init_from": str(source), "model.num_layers": want.num_layers + 1}), tmp_path / "run")
    assert s.model == want == checkpoints.dit_config(source) and s.init_from == str(source)


@pytest.mark.parametrize("config_file,message", [
    ("configs/train/tiny_cpu.py", r"config.data needs `path` \(a stepvideo-latents-v1 directory\) or `synthetic`"),
    ("configs/dpo/tiny_cpu.py", r"config.data needs `path` \(a stepvideo-preferences-v1 directory\) or `synthetic`"),
    ("configs/distill/demo.py", r"config.data needs `path` \(a stepvideo-reflow-v1 directory, written by "
                                r"python -m stepvideo_jax.data.reflow_job\)$"),
])
def test_a_run_without_data_is_refused_before_anything_is_made(tmp_path, config_file, message):
    """Neither `data.path` nor (where the objective has one) `data.synthetic`: the run stops before
    its workdir is made (each objective's `Objective.check_data`, asked first by `fit`)."""
    from stepvideo_jax.training import dpo, loop

    config = load_config(config_file, **{"data.path": "", "data.synthetic": None})
    with pytest.raises(ValueError, match=message):
        if config_file.startswith("configs/dpo"):
            dpo.train_dpo(config, tmp_path / "run", printer=None)
        else:
            loop.train(config, tmp_path / "run", printer=None)
    assert not (tmp_path / "run").exists()
