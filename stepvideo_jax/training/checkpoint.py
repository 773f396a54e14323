"""Orbax checkpoints of a training run: `TrainState` + data-iterator position, async, keep last K.

Layout: `<dir>/<step>/state` (params, optimizer state, EMA, step, key; sharded arrays) and
`<dir>/<step>/data` (the grain iterator state, JSON). Orbax writes a step into a temporary
directory and renames it when complete, so a run killed at any moment, also during a save, leaves
only complete steps behind; `latest_step()` only ever sees those and restore never reads a
half-written one. Restore takes an abstract state whose leaves carry the target shardings, so a
checkpoint restores onto a mesh of another size.

Failures are `CheckpointError`s with one-line messages: a save that fails in the background (full
disk, unwritable directory) is reported by the next `poll()` (the loop calls it every step), not
50 steps later at the next save; a step that does not restore (corrupt files) is named, and
`restore_latest(fallback=True)` moves it to `<dir>.corrupt/<step>` (nothing is deleted) and
resumes from the newest step that does restore.
A checkpoint written before the DiT blocks were
stacked (`blocks/<i>/...`, see `models/stack.py`) is refused by `restore` with the way out (export
its weights, which `checkpoints.load_dit` still reads, and start from them).
"""
from __future__ import annotations

import json
import os
from typing import Any, Callable, Optional

import jax
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

from stepvideo_jax import paths
from stepvideo_jax.checkpoints import short_reason
from stepvideo_jax.convert.errors import CheckpointError

from stepvideo_jax.models import stack


class UnrolledCheckpointError(ValueError):
    """A training checkpoint of the layout before the layers were stacked (`models/stack.py`)."""


class Checkpointer:
    """`save(step, state, data_state)` every `save_every` steps (async), keeping the last `keep`."""

    def __init__(self, directory: str | os.PathLike, *, save_every: int, keep: int = 3,
                 async_save: bool = True):
        if save_every < 1 or keep < 1:
            raise ValueError(f"save_every ({save_every}) and keep ({keep}) must be >= 1")
        self.directory = paths.absolute(directory)
        self._pending: Optional[int] = None    # step of a started save not yet known to have succeeded
        self._failed = False
        try:
            self.manager = ocp.CheckpointManager(
                self.directory,
                options=ocp.CheckpointManagerOptions(save_interval_steps=save_every, max_to_keep=keep,
                                                     enable_async_checkpointing=async_save,
                                                     create=True))
        except Exception as e:  # noqa: BLE001  (Orbax raises whatever the filesystem raised)
            raise CheckpointError(f"checkpoint directory {self.directory} cannot be opened: {short_reason(e)}") from e

    def latest_step(self) -> Optional[int]:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state, data_state: Optional[dict] = None, *, force: bool = False) -> bool:
        """Starts a save if `step` is due (or `force`); returns whether one started. The device
        arrays are copied to host before returning, so `state` may be donated right after.
        Raises `CheckpointError` if this save or an earlier background one failed."""
        try:
            started = self.manager.save(step, args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state or {})), force=force)
        except Exception as e:  # noqa: BLE001
            self._fail(self._pending if self._pending is not None else step, e)
        if started:
            self._pending = step
        return started

    def poll(self) -> None:
        """Raises `CheckpointError` if the last background save has finished with an error; cheap
        (no I/O, no wait) while it is still running or after it was found to have succeeded."""
        if self._pending is None or self.manager.is_saving_in_progress():
            return
        self.wait()

    def _saved_tree(self, step: int):
        """The nested-dict key structure of step `step`'s saved state (from Orbax's `_METADATA`
        file: a manager that has not saved in this process knows no item metadata), or None."""
        path = self.directory / str(step) / "state" / "_METADATA"
        try:
            entries = json.loads(path.read_text())["tree_metadata"].values()
        except (OSError, ValueError, KeyError, AttributeError):  # unreadable: the restore names the step
            return None
        tree: dict = {}
        for entry in entries:
            keys = [str(k["key"]) for k in entry.get("key_metadata", [])]
            node = tree
            for k in keys[:-1]:
                node = node.setdefault(k, {})
            if keys:
                node[keys[-1]] = None
        return tree

    def wait(self) -> None:
        """Blocks until the background save is done; `CheckpointError` if it failed."""
        try:
            self.manager.wait_until_finished()
        except Exception as e:  # noqa: BLE001
            self._fail(self._pending, e)
        self._pending = None

    def _fail(self, step, error: BaseException):
        self._failed = True
        raise CheckpointError(f"saving checkpoint step {step} in {self.directory} failed: {short_reason(error)}; "
                              "the run stops (check free space and permissions; the last complete step is "
                              f"{self._complete_on_disk()})") from error

    def _complete_on_disk(self) -> Optional[int]:
        steps = [int(p.name) for p in self.directory.glob("*") if p.name.isdigit()] if self.directory.is_dir() else []
        return max(steps, default=None)

    def restore(self, abstract_state, step: Optional[int] = None) -> tuple[Any, dict]:
        """(state, data_state) of `step` (default: the latest complete one).

        `abstract_state`: the state's structure with `jax.ShapeDtypeStruct` leaves carrying the
        target shardings (see `abstract_with_shardings`).
        """
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no complete checkpoint in {self.directory}")
        unrolled = stack.find_unrolled(self._saved_tree(step))
        if unrolled is not None:
            raise UnrolledCheckpointError(
                f"{self.directory}/{step}: written with unrolled layers ({unrolled}), before the DiT blocks were "
                "stacked into one scanned module; it cannot be resumed. Export its weights (this version reads "
                "the old layout) and start a new run from them: `python -m stepvideo_jax.export "
                f"--workdir {self.directory.parent} --out DIR [--ema]`, then `--config.init_from=DIR`")
        out = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
        return out.state, dict(out.data or {})

    def restore_latest(self, abstract_state, *, fallback: bool,
                       printer: Optional[Callable[[str], Any]] = print) -> tuple[int, Any, dict]:
        """(step, state, data_state) of the newest step that restores.

        A step that fails to restore is named in a `CheckpointError` (`fallback=False`), or, with
        `fallback=True`, the next older step is tried; once one restores, the failed newer ones are
        moved to `<dir>.corrupt/` (kept for inspection; Orbax would otherwise refuse to save their
        step numbers again). If no step restores, nothing is moved (the cause is then more likely
        a changed model or optimizer config than corrupt files).
        """
        failed: list[tuple[int, str]] = []
        for step in sorted(self.all_steps(), reverse=True):
            try:
                state, data = self.restore(abstract_state, step)
            except Exception as e:  # noqa: BLE001  (tensorstore, msgpack, JSON, OS errors alike)
                failed.append((step, short_reason(e)))
                if not fallback:
                    raise CheckpointError(
                        f"checkpoint step {step} in {self.directory} does not restore ({failed[-1][1]}); "
                        "set checkpoint.fallback=True to resume from the previous complete step, or move "
                        f"{self.directory / str(step)} away") from e
                if printer:
                    printer(f"checkpoint step {step} does not restore ({failed[-1][1]}); trying the previous one")
                continue
            if failed:
                self._set_aside([s for s, _ in failed])
                if printer:
                    printer(f"resuming from step {step}; the unreadable step(s) {[s for s, _ in failed]} were moved "
                            f"to {self._corrupt_dir()}")
            return step, state, data
        raise CheckpointError(f"no checkpoint in {self.directory} restores: " +
                              "; ".join(f"step {s}: {r}" for s, r in failed) +
                              " (a changed model/optimizer config also does this; nothing was moved)")

    def _corrupt_dir(self) -> epath.Path:
        return self.directory.with_name(self.directory.name + ".corrupt")

    def _set_aside(self, steps: list[int]) -> None:
        if jax.process_index() == 0:
            self._corrupt_dir().mkdir(exist_ok=True)
            for s in steps:
                target = self._corrupt_dir() / str(s)
                n = 1
                while target.exists():
                    target, n = self._corrupt_dir() / f"{s}.{n}", n + 1
                (self.directory / str(s)).rename(target)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("stepvideo_jax checkpoint set-aside")
        self.manager.reload()

    def close(self) -> None:
        """Waits for the background save and closes; after a failed save it only lets go (waiting
        again would re-raise, and Orbax's threads of the failed save never finish)."""
        if not self._failed:
            try:
                self.manager.close()
            except Exception as e:  # noqa: BLE001
                self._fail(self._pending, e)


def abstract_with_shardings(abstract_state, shardings):
    """ShapeDtypeStruct leaves of `abstract_state` placed by `shardings` (a prefix tree of it: one
    sharding per `nnx.Variable` or array, as `parallel.rules.state_shardings` returns)."""
    place = lambda s, sub: jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), sub)
    return jax.tree.map(place, shardings, abstract_state, is_leaf=lambda s: isinstance(s, jax.sharding.Sharding))
