"""Full-size DiT facts from the fixture's `full_size` record, checked without allocating weights.

`nnx.eval_shape` builds the 29.3B-parameter model abstractly (shapes only); parameters are grouped by
the official top-level module through the converter's own key map, so the count also checks that
the key map covers the full-size model.
"""
import functools
import math

from flax import nnx

from stepvideo_jax.convert import dit as dit_convert
from stepvideo_jax.convert.keymap import flat_shapes
from stepvideo_jax.models.dit import DiTConfig
from tests.fixtures import load_json

FULL = load_json("dit")["full_size"]


@functools.lru_cache(maxsize=None)
def full_config() -> DiTConfig:
    return dit_convert.config_from_dict(FULL["constructor_args"], label="fixture dit full_size")


@functools.lru_cache(maxsize=None)
def full_shapes() -> dict[str, tuple[int, ...]]:
    cfg = full_config()
    model = nnx.eval_shape(lambda: dit_convert.build(cfg, rngs=nnx.Rngs(0)))
    return flat_shapes(nnx.state(model, nnx.Param))


def test_full_config_is_the_official_default():
    cfg = full_config()
    assert cfg == DiTConfig.full()
    assert cfg.dim == FULL["inner_dim"]


def test_parameter_count():
    total = sum(math.prod(s) for s in full_shapes().values())
    assert total == FULL["num_parameters"]


def test_parameters_per_block():
    cfg = full_config()
    per_block = [sum(math.prod(s) for p, s in full_shapes().items() if p.startswith(f"blocks/{i}/"))
                 for i in range(cfg.num_layers)]
    assert per_block == [FULL["num_parameters_per_block"]] * cfg.num_layers


def test_parameters_by_official_top_level_module():
    """Every one of our parameters is attributed to the official module its key map rule reads."""
    shapes = full_shapes()
    owner = {r.dst: r.src.split(".")[0] for r in dit_convert.rules(full_config())}
    assert set(owner) == set(shapes)
    counts: dict[str, int] = {}
    for path, shape in shapes.items():
        counts[owner[path]] = counts.get(owner[path], 0) + math.prod(shape)
    assert counts == FULL["num_parameters_by_top_level_module"]


def test_official_key_count():
    assert len({r.src for r in dit_convert.rules(full_config())}) == FULL["num_state_dict_keys"]


def test_full_size_sequence_lengths():
    """204x544x992 px video -> latent grid -> self-attention length; text keys 77 + 320."""
    video = FULL["video_204x544x992"]
    b, f, c, h, w = video["latent_shape_bfchw"]
    cfg = full_config()
    assert c == cfg.in_channels
    assert f * (h // cfg.patch_size) * (w // cfg.patch_size) == video["self_attn_seq_len"]
