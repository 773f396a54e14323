"""The training state: one pytree holding everything a resume needs except the data iterator.

`params` and `ema` are `nnx.State`s of float32 `Param`s (master weights; the model computes in its
own `dtype`, e.g. bfloat16). `opt_state` mirrors `params`, so every array carries the logical axes
of the parameter it belongs to and `parallel.rules.state_shardings(state, mesh)` shards the whole
state. `key` is raw uint32 key data; step `n` uses `fold_in(key, n)`, so a resumed run draws the
same noise, timesteps and dropout as an uninterrupted one.
"""
from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct


class TrainState(struct.PyTreeNode):
    step: jax.Array            # int32 scalar: optimizer updates applied so far
    params: nnx.State          # float32 master weights
    opt_state: Any             # optax state of `params`
    ema: Optional[nnx.State]   # exponential moving average of `params`, or None
    key: jax.Array             # uint32 raw PRNG key data


def create(params: nnx.State, optimizer: optax.GradientTransformation, *, seed: int,
           use_ema: bool) -> TrainState:
    """Fresh state at step 0 (`params` float32; EMA starts equal to them)."""
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params),
                      ema=jax.tree.map(jnp.copy, params) if use_ema else None,
                      key=jax.random.key_data(jax.random.key(seed)))


def ema_update(ema: nnx.State, params: nnx.State, decay: float) -> nnx.State:
    """`decay * ema + (1 - decay) * params`, leaf by leaf in float32."""
    return jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, ema, params)
