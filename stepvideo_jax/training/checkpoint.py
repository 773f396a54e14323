"""Orbax checkpoints of a training run: `TrainState` + data-iterator position, async, keep last K.

Layout: `<dir>/<step>/state` (params, optimizer state, EMA, step, key; sharded arrays) and
`<dir>/<step>/data` (the grain iterator state, JSON). Orbax writes a step into a temporary
directory and renames it when complete, so a run killed at any moment, also during a save, leaves
only complete steps behind; `latest_step()` only ever sees those and restore never reads a
half-written one. Restore takes an abstract state whose leaves carry the target shardings, so a
checkpoint restores onto a mesh of another size.
"""
from __future__ import annotations

import os
import pathlib
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp


class Checkpointer:
    """`save(step, state, data_state)` every `save_every` steps (async), keeping the last `keep`."""

    def __init__(self, directory: str | os.PathLike, *, save_every: int, keep: int = 3,
                 async_save: bool = True):
        if save_every < 1 or keep < 1:
            raise ValueError(f"save_every ({save_every}) and keep ({keep}) must be >= 1")
        self.directory = pathlib.Path(directory).absolute()
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(save_interval_steps=save_every, max_to_keep=keep,
                                                 enable_async_checkpointing=async_save,
                                                 create=True))

    def latest_step(self) -> Optional[int]:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state, data_state: Optional[dict] = None, *, force: bool = False) -> bool:
        """Starts a save if `step` is due (or `force`); returns whether one started. The device
        arrays are copied to host before returning, so `state` may be donated right after."""
        return self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state or {})), force=force)

    def restore(self, abstract_state, step: Optional[int] = None) -> tuple[Any, dict]:
        """(state, data_state) of `step` (default: the latest complete one).

        `abstract_state`: the state's structure with `jax.ShapeDtypeStruct` leaves carrying the
        target shardings (see `abstract_with_shardings`).
        """
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no complete checkpoint in {self.directory}")
        out = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
        return out.state, dict(out.data or {})

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


def abstract_with_shardings(abstract_state, shardings):
    """ShapeDtypeStruct leaves of `abstract_state` placed by `shardings` (a prefix tree of it: one
    sharding per `nnx.Variable` or array, as `parallel.rules.state_shardings` returns)."""
    place = lambda s, sub: jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), sub)
    return jax.tree.map(place, shardings, abstract_state, is_leaf=lambda s: isinstance(s, jax.sharding.Sharding))
