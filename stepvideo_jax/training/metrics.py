"""Training metrics: training FLOPs, MFU, and a JSONL / TensorBoard writer.

FLOPs are the DiT's analytic count (`models/flops.py`). A training step costs 3x the forward
(forward + two backward matmuls per forward matmul); recomputation for remat is not counted, as MFU
conventionally measures useful model FLOPs.
"""
from __future__ import annotations

import json
import os
import socket
import time
from typing import Mapping, Optional

from stepvideo_jax import paths
from stepvideo_jax.models import flops
from stepvideo_jax.models.dit import DiTConfig

# Dense bf16 peak FLOP/s per chip, by the substring of `device.device_kind` (lower case).
PEAK_FLOPS = {
    "v6": 918e12, "v5p": 459e12, "v5 lite": 197e12, "v5e": 197e12, "v4": 275e12,
    "h200": 989e12, "h100": 989e12, "a100": 312e12,
}


def train_flops(cfg: DiTConfig, **shape) -> float:
    """Training FLOPs of one sample (3x the forward, `models.flops.forward_flops`)."""
    return 3.0 * flops.forward_flops(cfg, **shape)


def peak_flops_per_device(device_kind: str, override: Optional[float] = None) -> Optional[float]:
    """Peak bf16 FLOP/s of a chip (None when unknown, e.g. CPU: then no MFU is reported)."""
    if override:
        return float(override)
    kind = device_kind.lower()
    for key, value in PEAK_FLOPS.items():
        if key in kind:
            return value
    return None


class MetricsWriter:
    """Appends one JSON object per logged step to `<workdir>/metrics.jsonl`, mirrors scalars to a
    TensorBoard event file under `<workdir>/tensorboard` when `tensorboard=True`, and prints a
    one-line summary. Only process 0 writes the files (`paths.writes_shared_files`); a workdir URI
    (`gs://...`), where objects cannot be appended to, gets the whole file rewritten per row."""

    def __init__(self, workdir: str | os.PathLike, *, tensorboard: bool = False, printer=print):
        self.path = paths.as_path(workdir) / "metrics.jsonl"
        self.writes = paths.writes_shared_files()
        self._file = self._lines = self._tb = None
        if self.writes:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if paths.is_uri(self.path):
                self._lines = self.path.read_text().splitlines(keepends=True) if self.path.exists() else []
            else:
                self._file = open(self.path, "a")
            if tensorboard:
                self._tb = _EventFile(paths.as_path(workdir) / "tensorboard")
        self.printer = printer

    def write(self, step: int, scalars: Mapping[str, float]) -> None:
        row = {"step": int(step), **{k: float(v) for k, v in scalars.items()}}
        if self._file is not None:
            self._file.write(json.dumps(row) + "\n")
            self._file.flush()
        elif self._lines is not None:
            self._lines.append(json.dumps(row) + "\n")
            paths.write_text(self.path, "".join(self._lines))
        if self._tb is not None:
            self._tb.scalars(step, scalars)
        if self.printer is not None:
            self.printer(f"step {step}: " + ", ".join(f"{k} {_fmt(v)}" for k, v in scalars.items()))

    def discard_after(self, step: int) -> int:
        """Drops the records of steps after `step` (a resumed run replays them from its checkpoint,
        so they would appear twice); rewrites the file atomically. Returns how many were dropped.
        The TensorBoard event file is append-only: TensorBoard itself shows the newest value."""
        if not self.writes:
            return 0
        kept = lambda line: not line.strip() or _step_of(line) is None or _step_of(line) <= step  # noqa: E731
        if self._lines is not None:
            before, self._lines = len(self._lines), [ln for ln in self._lines if kept(ln)]
            if len(self._lines) != before:
                paths.write_text(self.path, "".join(self._lines))
            return before - len(self._lines)
        self._file.close()
        lines = self.path.read_text().splitlines(keepends=True)
        keep = [ln for ln in lines if kept(ln)]
        if len(keep) != len(lines):
            tmp = self.path.with_name(self.path.name + ".tmp")
            tmp.write_text("".join(keep))
            os.replace(tmp, self.path)
        self._file = open(self.path, "a")
        return len(lines) - len(keep)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        if self._tb is not None:
            self._tb.close()


class _EventFile:
    """A TensorBoard event file (TFRecord of `Event` protos with `simple_value` scalars), written
    with tensorflow's protos and record writer; the tensorboard package is not needed to write it."""

    def __init__(self, directory):
        # heavy, and only a run with metrics.tensorboard needs it
        import tensorflow as tf
        from tensorflow.core.framework import summary_pb2
        from tensorflow.core.util import event_pb2

        directory.mkdir(parents=True, exist_ok=True)
        self._event, self._summary, self._time = event_pb2.Event, summary_pb2.Summary, time.time
        self._writer = tf.io.TFRecordWriter(str(directory / f"events.out.tfevents.{int(time.time())}."
                                                f"{socket.gethostname()}.{os.getpid()}"))
        self._writer.write(self._event(wall_time=time.time(), file_version="brain.Event:2").SerializeToString())

    def scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        values = [self._summary.Value(tag=k, simple_value=float(v)) for k, v in scalars.items()]
        event = self._event(wall_time=self._time(), step=int(step), summary=self._summary(value=values))
        self._writer.write(event.SerializeToString())
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


def _fmt(v: float) -> str:
    v = float(v)
    return f"{v:.4g}" if abs(v) < 1e5 else f"{v:.3e}"


def _step_of(line: str):
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    with paths.as_path(path).open() as f:
        return [json.loads(line) for line in f if line.strip()]
