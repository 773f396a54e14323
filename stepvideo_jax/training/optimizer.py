"""Optax AdamW with warmup + cosine/constant learning rate and global-norm clipping.

The optimizer state mirrors the float32 master parameters (an `nnx.State` of `Param`s), so its
moments carry the same logical `axes` metadata and shard exactly like the parameters.
"""
from __future__ import annotations

import dataclasses

import optax

SCHEDULES = ("cosine", "constant")


@dataclasses.dataclass(frozen=True)
class OptimSettings:
    """The optimiser of a run (`config.optim` and the schedule's end, `total_steps`); the schedule
    kind and the warmup are checked when the settings are made."""

    learning_rate: float
    warmup_steps: int
    total_steps: int
    schedule: str = "cosine"
    end_fraction: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0
    clip_norm: float = 1.0        # 0: no clipping

    def __post_init__(self):
        check_schedule(self.schedule, warmup_steps=self.warmup_steps, total_steps=self.total_steps)


def build(o: OptimSettings) -> tuple[optax.Schedule, optax.GradientTransformation]:
    """(learning-rate schedule, clipped AdamW) of the settings."""
    schedule = learning_rate_schedule(o.learning_rate, warmup_steps=o.warmup_steps, total_steps=o.total_steps,
                                      kind=o.schedule, end_fraction=o.end_fraction)
    return schedule, adamw(schedule, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay,
                           clip_norm=o.clip_norm or None)


def check_schedule(kind: str, *, warmup_steps: int, total_steps: int) -> None:
    if kind not in SCHEDULES:
        raise ValueError(f"unknown learning-rate schedule {kind!r}; choose one of {SCHEDULES}")
    if warmup_steps < 0 or total_steps <= warmup_steps:
        raise ValueError(f"need 0 <= warmup_steps < total_steps, got {warmup_steps}, {total_steps}")


def learning_rate_schedule(peak: float, *, warmup_steps: int, total_steps: int, kind: str = "cosine",
                           end_fraction: float = 0.0) -> optax.Schedule:
    """Linear warmup 0 -> peak over `warmup_steps`, then cosine to `end_fraction * peak` at
    `total_steps` ("cosine") or flat ("constant")."""
    check_schedule(kind, warmup_steps=warmup_steps, total_steps=total_steps)
    if kind == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, peak, warmup_steps, total_steps,
                                                  end_value=end_fraction * peak)
    warmup = optax.linear_schedule(0.0, peak, warmup_steps) if warmup_steps else optax.constant_schedule(peak)
    return optax.join_schedules([warmup, optax.constant_schedule(peak)], [warmup_steps])


def adamw(schedule: optax.Schedule, *, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
          weight_decay: float = 0.0, clip_norm: float | None = 1.0) -> optax.GradientTransformation:
    """Global-norm clipping (skipped when `clip_norm` is None) followed by AdamW."""
    parts = [optax.clip_by_global_norm(clip_norm)] if clip_norm else []
    parts.append(optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay))
    return optax.chain(*parts)
