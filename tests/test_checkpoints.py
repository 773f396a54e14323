"""`stepvideo_jax.checkpoints`: one detection of every weight source, one loader for each kind."""
import jax
import numpy as np
import pytest
from flax import nnx

from stepvideo_jax import checkpoints
from stepvideo_jax.convert import conversion
from tests.fixtures import fixture_dir

RELEASE = fixture_dir("release_layout") / "stepvideo-t2v"


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    return conversion.convert_release(RELEASE, tmp_path_factory.mktemp("ckpt") / "ckpt", components=["transformer"],
                               dtype="float32")


def test_each_source_kind_is_detected_once(converted, tmp_path):
    (tmp_path / "run" / checkpoints.WORKDIR_CHECKPOINTS).mkdir(parents=True)
    assert checkpoints.source_kind(RELEASE) == "release"
    assert checkpoints.source_kind(RELEASE / "transformer") == "transformer"
    assert checkpoints.source_kind(converted) == "converted"
    assert checkpoints.source_kind(tmp_path / "run") == "workdir"
    assert checkpoints.is_converted(converted) and not checkpoints.is_converted(RELEASE)
    with pytest.raises(ValueError, match="is none of: a converted checkpoint .*training workdir"):
        checkpoints.source_kind(tmp_path)
    with pytest.raises(ValueError, match="only a training workdir takes the suffix ':ema'"):
        checkpoints.dit_source(f"{RELEASE}:ema")
    assert checkpoints.dit_source(f"{tmp_path / 'run'}:ema") == checkpoints.DiTSource(
        "workdir", tmp_path / "run", ema=True)


def test_the_dit_of_every_source_is_the_same(converted):
    """A release directory, its transformer/ and its conversion give one config and the same weights."""
    want_cfg = checkpoints.dit_config(RELEASE / "transformer")
    want = nnx.state(checkpoints.load_dit(RELEASE / "transformer"))
    for source in (RELEASE, converted):
        assert checkpoints.dit_config(source) == want_cfg
        got = nnx.state(checkpoints.load_dit(source))
        assert jax.tree.structure(got) == jax.tree.structure(want)
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_ema_needs_a_training_workdir():
    with pytest.raises(ValueError, match="EMA weights come from a training workdir only"):
        checkpoints.load_dit(RELEASE, ema=True)
