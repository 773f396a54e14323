"""The persistent compilation cache every CLI turns on: a second run of a job loads its compiled
programs from disk instead of compiling them again.

Config fields (every CLI config has them): `compile_cache` (bool, default True) and
`compile_cache_dir` ("" = `$XDG_CACHE_HOME/stepvideo_jax/jax_cache`, i.e.
`~/.cache/stepvideo_jax/jax_cache` by default). Every program is cached, however short its compile
(the small CPU programs of the demo compile in well under JAX's default 1 s threshold).
"""
from __future__ import annotations

import os
import pathlib
from typing import Optional

import jax


def default_dir() -> pathlib.Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return pathlib.Path(base) / "stepvideo_jax" / "jax_cache"


def setup(config=None, *, enabled: Optional[bool] = None, directory: Optional[str] = None) -> Optional[pathlib.Path]:
    """Turn the cache on (or leave it off) from `config`'s `compile_cache` / `compile_cache_dir`
    fields, or the explicit arguments; returns the directory in use, or None when off."""
    if config is not None:   # every command's config family carries both fields
        enabled = config.compile_cache if enabled is None else enabled
        directory = config.compile_cache_dir if directory is None else directory
    enabled = True if enabled is None else enabled
    if not enabled:
        return None
    path = pathlib.Path(directory).expanduser() if directory else default_dir()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"compile_cache_dir {str(path)!r} cannot be created ({e}); set "
                         "--config.compile_cache_dir to a writable directory or --config.compile_cache=False") from None
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return path

