"""How loud a command-line run is: what a person needs by default, library chatter on request.

`quiet_unless_asked()` runs in every absl CLI once its flags are parsed. Without `--verbosity`
(absl's own flag) it turns off the start-up noise of the libraries underneath: absl and Orbax INFO
records (absl verbosity WARNING), TensorFlow's C++ log (`TF_CPP_MIN_LOG_LEVEL=3` unless the
environment sets it) and the lines TensorFlow and its sentencepiece op write straight to the
process's stderr while they load (`native_stderr_quiet`). `--verbosity=0` brings the INFO records
back; `--verbosity=1` also prints every config field instead of the short summary. Library use
(no CLI) keeps every library's own defaults.
"""
from __future__ import annotations

import contextlib
import os
import sys
from typing import Iterator

from absl import flags
from absl import logging as absl_logging

_verbosity: int | None = None   # None: not a CLI run; -1: quiet; >= 0: --verbosity given


def quiet_unless_asked() -> int:
    """Apply the CLI default (see the module docstring); returns the verbosity (-1: quiet)."""
    global _verbosity

    if flags.FLAGS["verbosity"].present:
        _verbosity = int(flags.FLAGS.verbosity)
    else:
        _verbosity = -1
        absl_logging.set_verbosity(absl_logging.WARNING)
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    return _verbosity


def verbosity() -> int:
    """-1 in a quiet CLI run, the `--verbosity` value when given, 0 outside a CLI."""
    return 0 if _verbosity is None else _verbosity


@contextlib.contextmanager
def native_stderr_quiet() -> Iterator[None]:
    """In a quiet CLI run, drop what native code writes to file descriptor 2 inside the block
    (TensorFlow's start-up lines); Python exceptions still propagate. Elsewhere: no effect."""
    if verbosity() >= 0:
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)
