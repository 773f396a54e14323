"""Dtype names as configs and command lines spell them, and the dtypes they stand for.

`DTYPES` is the one table: parameters are stored and computed in float32 or bfloat16 (the released
shards' dtype). The values are JAX's scalar types; `np.dtype(DTYPES[name])` gives the numpy dtype
(bfloat16 is ml_dtypes' type in both).
"""
from __future__ import annotations

import jax.numpy as jnp

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def dtype_of(name: str, *, what: str = "dtype"):
    """The dtype called `name`; a ValueError naming `what` and the valid names otherwise."""
    if name not in DTYPES:
        raise ValueError(f"{what}={name!r}: choose one of {sorted(DTYPES)}")
    return DTYPES[name]
