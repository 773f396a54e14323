"""Where the shipped config files are, so that `--config configs/generate/release.py` works from any
directory and from an installed package.

In a source checkout the configs are the project's top-level `configs/` folder; an installed package
carries the same files as `stepvideo_jax/configs/` (pyproject.toml maps the folder there). A
`--config` value is used as given when that file exists (relative to the current directory, as
`ml_collections.config_flags` reads it), else it is looked up in the shipped configs, with or without
the leading `configs/`. The `:arg` suffix of a config value (`pod_544x992.py:v5p-256`) is kept.
"""
from __future__ import annotations

import importlib.util
import os
import pathlib
import sys
from types import ModuleType
from typing import Sequence

_PACKAGE = pathlib.Path(__file__).resolve().parent
_FLAG_NAMES = ("--config", "-config")


def root() -> pathlib.Path:
    """The folder of the shipped configs (installed package first, then the source checkout)."""
    for candidate in (_PACKAGE / "configs", _PACKAGE.parent / "configs"):
        if (candidate / "generate").is_dir():
            return candidate
    raise FileNotFoundError(f"no shipped configs next to {_PACKAGE} (looked for configs/generate/ in the package "
                            "and in its source checkout); reinstall the package")


def path(name: str) -> pathlib.Path:
    """A shipped config file by its name under `configs/`, e.g. `path("generate/demo.py")`."""
    return root() / name


def available() -> list[str]:
    """Every shipped config file, as `<folder>/<name>.py` (a family's `common.py` is no config)."""
    base = root()
    return sorted(str(p.relative_to(base)) for p in base.glob("*/*.py")
                  if not p.name.startswith("_") and p.name != COMMON)


COMMON = "common.py"   # the fields and defaults of every config of a family (configs/<family>/common.py)


def module(name: str) -> ModuleType:
    """A shipped config module by its name under `configs/` (e.g. `module("train/common.py")`),
    imported by path: config files are loaded by path (`ml_collections.config_flags`), not as a
    package, and the folder sits at the top of a checkout but inside an installed package."""
    file = path(name)
    spec = importlib.util.spec_from_file_location(f"stepvideo_configs.{name[:-3].replace('/', '.')}", file)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def resolve(value: str) -> str:
    """A `--config` value with its file found: as given if it exists, else inside the shipped configs.

    Raises FileNotFoundError naming the shipped configs when neither exists.
    """
    file, sep, arg = value.partition(":")
    if os.path.exists(file):
        return value
    rel = pathlib.PurePosixPath(file)
    names = [rel] + ([pathlib.PurePosixPath(*rel.parts[1:])] if rel.parts[:1] == ("configs",) else [])
    for name in names:
        candidate = root() / name
        if not rel.is_absolute() and candidate.is_file():
            return f"{candidate}{sep}{arg}"
    raise FileNotFoundError(f"config file {file!r} not found in {os.getcwd()} nor among the shipped configs; "
                            f"shipped: {', '.join('configs/' + n for n in available())}")


def resolve_argv(argv: Sequence[str] | None = None) -> list[str]:
    """`argv` (default `sys.argv`) with the value of `--config` resolved by `resolve`; exits with a
    one-line error (status 2) when the file is nowhere."""
    argv = list(sys.argv if argv is None else argv)
    out = []
    expect_value = False
    try:
        for arg in argv:
            if expect_value:
                out.append(resolve(arg))
                expect_value = False
                continue
            name, eq, value = arg.partition("=")
            if name in _FLAG_NAMES and eq:
                arg = f"{name}={resolve(value)}"
            elif name in _FLAG_NAMES:
                expect_value = True
            out.append(arg)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    return out
