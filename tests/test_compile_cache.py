"""The persistent compilation cache of the CLIs: default directory under the user's cache, moved by
`compile_cache_dir`, off with `compile_cache=False`; every CLI config carries both fields."""
import pathlib

import jax
import ml_collections
import pytest

from stepvideo_jax import compile_cache
from tests.fixtures import load_config

ROOT = pathlib.Path(__file__).resolve().parents[1]
KEYS = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
        "jax_persistent_cache_min_entry_size_bytes")


@pytest.fixture
def restore_jax_config():
    old = [getattr(jax.config, k) for k in KEYS]
    yield
    for k, v in zip(KEYS, old):
        jax.config.update(k, v)


def _config(**fields):
    return ml_collections.ConfigDict(fields)


def test_default_dir_follows_xdg(monkeypatch, tmp_path, restore_jax_config):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    path = compile_cache.setup(_config(compile_cache=True, compile_cache_dir=""))
    assert path == tmp_path / "xdg" / "stepvideo_jax" / "jax_cache" and path.is_dir()
    assert jax.config.jax_compilation_cache_dir == str(path)
    assert jax.config.jax_persistent_cache_min_compile_time_secs == 0
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert compile_cache.default_dir() == tmp_path / "home" / ".cache" / "stepvideo_jax" / "jax_cache"


def test_moved_and_turned_off(tmp_path, restore_jax_config):
    jax.config.update("jax_compilation_cache_dir", None)
    assert compile_cache.setup(_config(compile_cache=False, compile_cache_dir=str(tmp_path / "x"))) is None
    assert jax.config.jax_compilation_cache_dir is None and not (tmp_path / "x").exists()
    assert compile_cache.setup(_config(compile_cache=True, compile_cache_dir=str(tmp_path / "x"))) == tmp_path / "x"
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(ValueError, match="compile_cache_dir"):
        compile_cache.setup(_config(compile_cache=True, compile_cache_dir=str(blocker / "sub")))


@pytest.mark.parametrize("relpath", sorted(str(p.relative_to(ROOT)) for p in (ROOT / "configs").rglob("*.py")
                                            if p.name != "common.py"))  # common.py: a family's base, no CLI config
def test_every_cli_config_has_the_cache_fields(relpath):
    config = load_config(relpath)
    assert config.compile_cache is True and config.compile_cache_dir == ""
