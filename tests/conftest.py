"""Test-session setup shared by every test.

Sharding tests need several devices. On CPU we provide 8 fake host devices through
`XLA_FLAGS=--xla_force_host_platform_device_count=8`, set here once, before jax is imported
anywhere. Single-device tests are unaffected: un-sharded computations run on device 0 exactly as
they would with one device; tests that want a mesh build it explicitly from `jax.devices()`.
"""
import os

_FLAG = "--xla_force_host_platform_device_count=8"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAG).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# TensorFlow (tokenizers only) must stay quiet and off accelerators.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax  # noqa: E402  (after XLA_FLAGS on purpose)
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

from tests.fixtures import fixture_dir  # noqa: E402


@pytest.fixture(scope="session")
def fixtures_root():
    from tests.fixtures import fixtures_root as root

    return root()


@pytest.fixture(scope="module")
def compile_cache(tmp_path_factory):
    """A persistent compilation cache for one test module: repeated runs of the same program
    (e.g. a training run and its resumed copy) compile once."""
    keys = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
            "jax_persistent_cache_min_entry_size_bytes")
    old = [getattr(jax.config, k) for k in keys]
    for k, v in zip(keys, (str(tmp_path_factory.mktemp("jax_cache")), 0, 0)):
        jax.config.update(k, v)
    yield
    for k, v in zip(keys, old):
        jax.config.update(k, v)


__all__ = ["fixture_dir"]
