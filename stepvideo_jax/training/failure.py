"""How a training command fails: one clear line on stderr and a prompt non-zero exit, never a hang.

The expected failures of a run (a start-up check, a checkpoint save or restore, the dataset, a
non-finite loss) carry one-line messages; `run_or_exit` prints that line and leaves with
`os._exit(1)`. A plain exit is not enough: after a failed async save, Orbax's background threads
wait forever for signals of the failed write, and the interpreter's shutdown would join them (the
probe of issue 21 hung after "PermissionError"). Any other exception is a bug and keeps its
traceback.
"""
from __future__ import annotations

import os
import sys
from typing import Any, Callable

from stepvideo_jax.data.format import DatasetError
from stepvideo_jax.training.checkpoint import CheckpointError
from stepvideo_jax.training.loop import NonFiniteLoss
from stepvideo_jax.training.startup import StartupError

EXPECTED = (StartupError, CheckpointError, DatasetError, NonFiniteLoss)


def run_or_exit(fn: Callable[..., Any], *args, prog: str, **kwargs) -> Any:
    """`fn(*args, **kwargs)`; on an expected failure prints `<prog>: error: <message>` and exits 1."""
    try:
        return fn(*args, **kwargs)
    except EXPECTED as e:
        _exit_with_line(f"{prog}: error: {e}")


def _exit_with_line(line: str) -> None:
    """Writes `line` as the last line of stderr and exits 1 at once. Background threads of a failed
    save may still be printing tracebacks: stderr's descriptor is pointed at /dev/null first, and
    the line goes to a saved copy of it, so nothing lands after it."""
    sys.stdout.flush()
    sys.stderr.flush()
    real = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    os.write(real, (line.replace("\n", " ") + "\n").encode())
    os._exit(1)
