"""Locating the golden fixtures: `../shared/fixtures` or `$STEPVIDEO_FIXTURES`.

A missing fixture is an error, never a skip: parity is the point of these tests.
"""
import json
import os
import pathlib

import numpy as np

PROJECT_ROOT = pathlib.Path(__file__).resolve().parents[1]


def fixtures_root() -> pathlib.Path:
    root = os.environ.get("STEPVIDEO_FIXTURES")
    path = pathlib.Path(root) if root else PROJECT_ROOT.parent / "shared" / "fixtures"
    if not path.is_dir():
        raise FileNotFoundError(
            f"fixtures root {path} does not exist: put the shared fixtures at ../shared/fixtures "
            "(relative to the project root) or set STEPVIDEO_FIXTURES to their root")
    return path


def fixture_dir(name: str) -> pathlib.Path:
    path = fixtures_root() / name
    if not path.is_dir():
        raise FileNotFoundError(f"fixture {name!r} not found at {path}")
    return path


def load_json(name: str, filename: str = "config.json") -> dict:
    with open(fixture_dir(name) / filename) as f:
        return json.load(f)


def load_npz(name: str, filename: str) -> dict:
    path = fixture_dir(name) / filename
    if not path.is_file():
        raise FileNotFoundError(f"fixture file {path} not found")
    with np.load(path, allow_pickle=False) as data:
        return {k: data[k] for k in data.files}


def assert_close(actual, expected, *, atol, rtol, name=""):
    """np.testing.assert_allclose with the max abs error in the message."""
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, f"{name}: shape {actual.shape} != {expected.shape}"
    err = float(np.max(np.abs(actual - expected))) if actual.size else 0.0
    np.testing.assert_allclose(actual, expected, atol=atol, rtol=rtol,
                               err_msg=f"{name}: max abs err {err:.3e}")
    return err


def load_config(relpath: str, **overrides):
    """`get_config()` of a config file under the project root (`file.py:arg`: `get_config(arg)`, as
    `--config` reads it), with dotted-key overrides applied."""
    import importlib.util

    relpath, sep, arg = relpath.partition(":")
    path = PROJECT_ROOT / relpath
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config(arg) if sep else module.get_config()
    for key, value in overrides.items():
        node = config
        *parents, last = key.split(".")
        for p in parents:
            node = node[p]
        node[last] = value
    return config
