"""Files a release names stay inside the release: containment checks and safe copies.

A release directory is shared data. Names it holds (an index's `weight_map` entries, shard and
config files, tokenizer files, symlinks) must not make a reader open or copy a file elsewhere on the
machine. Each component folder gets an *allowed root*: by default the folder itself after resolving
its own symlinks (so a release whose `vae/` is a link to another release's `vae/`, as
`export --release` writes, still works), or, inside a Hugging Face hub cache
(`.../models--org--name/snapshots/<revision>/...`), the repo folder `models--org--name/`, because the
snapshot's files are symlinks into that repo's `blobs/`. Callers that know better (an installer)
pass the root explicitly.

Every named file must be a relative path without `..` and, after resolving symlinks, lie inside the
allowed root; otherwise a `CheckpointError` names the entry, before anything is opened.
"""
from __future__ import annotations

import json
import os
import pathlib
import shutil

from stepvideo_jax.convert.errors import CheckpointError

COPY_MODE = 0o644
HUB_REPO_PREFIXES = ("models--", "datasets--", "spaces--")


def hub_repo_root(folder: str | os.PathLike) -> pathlib.Path | None:
    """`.../models--org--name` when `folder` lies in a hub cache snapshot
    (`.../models--org--name/snapshots/<revision>[/...]`), else None."""
    parts = pathlib.Path(os.path.abspath(folder)).parts
    for i in range(len(parts) - 2, 0, -1):
        if parts[i] == "snapshots" and parts[i - 1].startswith(HUB_REPO_PREFIXES):
            return pathlib.Path(*parts[:i]).resolve()
    return None


def default_root(folder: str | os.PathLike) -> pathlib.Path:
    """The allowed root of the component folder `folder` (see the module docstring)."""
    return hub_repo_root(folder) or pathlib.Path(folder).resolve()


def contained(path: str | os.PathLike, root: str | os.PathLike, *, what: str) -> pathlib.Path:
    """`path` with symlinks resolved, if that lies inside `root` (resolved); else a CheckpointError
    naming `what`."""
    root = pathlib.Path(root).resolve()
    resolved = pathlib.Path(path).resolve()
    if resolved != root and root not in resolved.parents:
        raise CheckpointError(f"{what}: resolves to {resolved}, outside the allowed root {root}; files a "
                              "release names must stay inside it (symlinks out of the release are refused; a "
                              "release that deliberately links into another store: convert --allowed-root STORE)")
    return resolved


def check_name(name, *, what: str) -> str:
    """`name` if it is a non-empty relative path without `..` components, else a CheckpointError."""
    if not isinstance(name, str) or not name or "\0" in name:
        raise CheckpointError(f"{what}: {name!r} is not a file name")
    path = pathlib.PurePosixPath(name.replace("\\", "/"))
    if path.is_absolute() or pathlib.PureWindowsPath(name).drive or ".." in path.parts:
        raise CheckpointError(f"{what}: {name!r} is not a relative path inside the release "
                              "(absolute paths and '..' are refused)")
    return name


def release_file(folder: str | os.PathLike, name: str, root: str | os.PathLike | None = None, *,
                 what: str | None = None) -> pathlib.Path:
    """The file `name` of the component folder `folder`, resolved and checked to lie inside `root`
    (default `default_root(folder)`). It need not exist; callers check that."""
    folder = pathlib.Path(folder)
    what = what or str(folder / str(name))
    check_name(name, what=what)
    return contained(folder / name, default_root(folder) if root is None else root, what=what)


def read_json(folder: str | os.PathLike, name: str, root: str | os.PathLike | None = None, *,
              expected: str) -> dict:
    """The JSON file `name` of the component folder `folder` (checked by `release_file`), parsed; a
    CheckpointError for a missing file (`expected`: where the release keeps it) or invalid JSON."""
    path = pathlib.Path(folder) / name
    release_file(folder, name, root)
    if not path.is_file():
        raise CheckpointError(f"{path}: config not found (expected the release's {expected})")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None


def contained_files(src: str | os.PathLike, root: str | os.PathLike) -> list[tuple[pathlib.Path, pathlib.PurePath]]:
    """`(resolved file, path relative to src)` for the file `src` or every file under the folder
    `src`, each (and every symlink on the way) checked to lie inside `root`; anything that is not
    a regular file or folder (a fifo, a device) is an error. Nothing is read."""
    src = pathlib.Path(src)

    def walk(path: pathlib.Path, rel: pathlib.PurePath):
        resolved = contained(path, root, what=str(path))
        if resolved.is_dir():
            for child in sorted(path.iterdir()):
                yield from walk(child, rel / child.name)
        elif resolved.is_file():
            yield resolved, rel
        else:
            raise CheckpointError(f"{path}: not a regular file or folder; refusing to copy it")

    return list(walk(src, pathlib.PurePath()))


def copy_files(files: list[tuple[pathlib.Path, pathlib.PurePath]], dst: str | os.PathLike) -> None:
    """Copy `contained_files` output under `dst`: contents only, each file with mode 0644 whatever
    the source's mode (a private source must not become readable by others through a lax umask, a
    read-only one must not make the output undeletable)."""
    dst = pathlib.Path(dst)
    for src, rel in files:
        target = dst / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, target)
        os.chmod(target, COPY_MODE)
