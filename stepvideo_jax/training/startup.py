"""Start-up checks of a training run: what must hold before anything is built or compiled.

- The workdir and its checkpoint directory exist (created if missing) and take a file: a run that
  cannot save otherwise trains until its first save and then fails inside Orbax's threads.
- The dataset is complete and consistent: every indexed sample file is present, and (local paths)
  the array shapes and dtypes in each file's headers agree with the index and `meta.json`. Remote
  paths (`gs://...`) are checked for the index and the files' existence only, to keep start-up cheap.
  `python -m stepvideo_jax.verify` reads every array instead.

Each failure is a `StartupError` (or the dataset's `DatasetError`) with a one-line message.
"""
from __future__ import annotations

import os
import uuid

from etils import epath

from stepvideo_jax import paths


class StartupError(RuntimeError):
    pass


def check_writable(directory: str | os.PathLike, role: str, *, keep: bool = True) -> epath.Path:
    """Creates `directory` if needed and writes and removes a probe file in it; returns the
    absolute path (a URI stays one). `role` names the directory in the error ("workdir",
    "checkpoint directory"). `keep=False`: the directories this check created are removed again,
    so an error later in start-up leaves nothing behind."""
    path = paths.absolute(directory)
    created = [] if keep else [p for p in (path, *path.parents) if not p.exists()]    # deepest first
    probe = path / f".write-check-{uuid.uuid4().hex}"
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as e:
        raise StartupError(f"the {role} {path} is not writable ({type(e).__name__}: {e.strerror or e}); "
                           "choose another --workdir or fix the path") from None
    finally:
        for p in created:
            try:
                p.rmdir()
            except OSError:
                break
    return path


def is_remote(path) -> bool:
    """`scheme://...` paths (gs://, s3://): start-up checks stay cheap there."""
    return "://" in str(path)


def check_run_directories(workdir: str | os.PathLike, checkpoint_dir: str | os.PathLike) -> None:
    check_writable(workdir, "workdir")
    check_writable(checkpoint_dir, "checkpoint directory", keep=False)   # Orbax creates it at its first save


def check_dataset(dataset, source, *, headers: bool = True) -> None:
    """`dataset.check(headers=...)` (see `data.format.Dataset.check`): headers are read when
    `headers` (`config.data.check_headers`; ~0.6 ms a file on local disk, 2 busy CPU cores) and
    `source`, the configured data path, is not remote."""
    dataset.check(headers=headers and not is_remote(source))
