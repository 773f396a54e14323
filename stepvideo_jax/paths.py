"""Paths of workdirs, checkpoints, datasets and outputs: local paths and `etils.epath` URIs alike
(`gs://bucket/run`, `s3://...`), and which process writes the files every host would otherwise
write.

`pathlib.Path("gs://b/run")` is `gs:/b/run` and `.absolute()` makes it `<cwd>/gs:/b/run`, so user
paths go through `as_path` / `absolute` instead: URIs stay URIs, local paths become absolute.
Files that tools other than `epath` must write (ffmpeg's mp4, `np.save`) are written to a local
temporary file and then moved to their destination (`local_then_move`), so an interrupted run never
leaves a half-written file at the destination, local or remote.

Multi-host runs: every process computes, process 0 alone writes the shared files (metrics, samples,
videos, manifests, summaries; `writes_shared_files`). Orbax checkpoints are the exception: every
process writes its own shards, as Orbax expects.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import uuid
from typing import Iterator

import jax
from etils import epath


def is_uri(path) -> bool:
    """True for `scheme://...` paths (gs, s3, az, hf): not on the local file system."""
    return "://" in os.fspath(path)


def as_path(path) -> epath.Path:
    """An `epath.Path` that keeps a URI as given (local paths: `~` expanded)."""
    if isinstance(path, epath.Path):
        return path
    text = os.fspath(path)
    return epath.Path(text if is_uri(text) else os.path.expanduser(text))


def absolute(path) -> epath.Path:
    """`as_path`, made absolute when local (Orbax refuses relative paths); URIs unchanged."""
    path = as_path(path)
    return path if is_uri(path) else epath.Path(os.path.abspath(os.fspath(path)))


def writes_shared_files() -> bool:
    """True on the process that writes shared files (process 0; every process of a 1-host run)."""
    return jax.process_index() == 0


@contextlib.contextmanager
def local_then_move(destination, suffix: str = "") -> Iterator[str]:
    """Yields a local file name to write; on success the file replaces `destination` (a rename
    when local, a copy then delete when remote); on failure it is removed and `destination` is
    untouched."""
    destination = as_path(destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    if is_uri(destination):
        folder = tempfile.mkdtemp(prefix="stepvideo-")
        local = os.path.join(folder, f"file{suffix}")
    else:
        folder = None
        local = os.fspath(destination.with_name(f".{destination.stem}.{uuid.uuid4().hex[:8]}.partial{suffix}"))
    try:
        yield local
        if folder is None:
            os.replace(local, os.fspath(destination))
        else:
            epath.Path(local).copy(destination, overwrite=True)
    finally:
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)
        elif os.path.exists(local):
            os.unlink(local)


def write_text(destination, text: str) -> epath.Path:
    """Atomically replace `destination` with `text` (UTF-8)."""
    destination = as_path(destination)
    with local_then_move(destination) as local:
        with open(local, "w", encoding="utf-8") as f:
            f.write(text)
    return destination
