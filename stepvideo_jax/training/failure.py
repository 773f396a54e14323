"""How a training command fails: one clear line on stderr and a prompt non-zero exit, never a hang.

The expected failures of a run (a start-up check, a checkpoint save or restore, the dataset, a
non-finite loss) carry one-line messages; `run_or_exit` prints that line and leaves with
`os._exit(1)`. A plain exit is not enough: after a failed async save, Orbax's background threads
wait forever for signals of the failed write, and the interpreter's shutdown would join them (the
probe of issue 21 hung after "PermissionError"). Any other exception is a bug and keeps its
traceback.

A failed background write also makes Orbax and tensorstore print on their own (the full-disk
probe: about 1,000 lines before the run's error): `run_or_exit` shortens Orbax's error log records
to their first line (their tracebacks and tensorstore specs run to hundreds of lines) and drops
the unraisable `RuntimeError: Event loop is closed` that tensorstore's callbacks report for every
array of a failed write after Orbax closed its event loop. Everything else is printed as before.
"""
from __future__ import annotations

import logging
import os
import sys
from typing import Any, Callable

from stepvideo_jax.convert.errors import CheckpointError
from stepvideo_jax.data.format import DatasetError
from stepvideo_jax.training.loop import NonFiniteLoss
from stepvideo_jax.training.startup import StartupError

EXPECTED = (StartupError, CheckpointError, DatasetError, NonFiniteLoss)


def run_or_exit(fn: Callable[..., Any], *args, prog: str, **kwargs) -> Any:
    """`fn(*args, **kwargs)`; on an expected failure prints `<prog>: error: <message>` and exits 1."""
    _quiet_failed_write_noise()
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


class _FirstLineOfOrbaxErrors(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR and f"{os.sep}orbax{os.sep}" in record.pathname:
            text = (record.getMessage().splitlines() or [""])[0].split(" [tensorstore_spec=")[0]
            record.msg, record.args = text[:300], ()
            record.exc_info = record.exc_text = record.stack_info = None
        return True


def _quiet_failed_write_noise() -> None:
    logging.getLogger("absl").addFilter(_FirstLineOfOrbaxErrors())
    default = sys.unraisablehook

    def hook(unraisable):
        if not (unraisable.exc_type is RuntimeError and str(unraisable.exc_value) == "Event loop is closed"):
            default(unraisable)

    sys.unraisablehook = hook
