"""The command line of the training jobs (`python -m stepvideo_jax.train`, `... train_dpo`).

Flags: `--config` (a config file, big_vision style `file.py[:arg]`, fields overridable as
`--config.x=...`), `--workdir` (overrides `config.workdir`) and `--multihost`. The flags are defined
when the command runs, not when its module is imported, so every job module imports cleanly
alongside the others. Every process starts the same way (`parallel.mesh.initialize_distributed`:
a multi-process launch is detected, `--multihost` forces it) and an expected failure ends the run
with one line (`training.failure.run_or_exit`).
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

from absl import app, flags
from ml_collections import config_flags

from stepvideo_jax import compile_cache, config_files, logs
from stepvideo_jax.parallel.mesh import initialize_distributed
from stepvideo_jax.training.failure import run_or_exit


def run(job: Callable[..., Any], *, prog: str, config_help: str, argv: Sequence[str] | None = None) -> None:
    """Parse the command line, start JAX (multi-host when launched so) and run `job(config, workdir)`."""
    config = config_flags.DEFINE_config_file("config", None, config_help, lock_config=True)
    workdir = flags.DEFINE_string("workdir", None, "run directory (checkpoints, metrics); default config.workdir")
    multihost = flags.DEFINE_bool("multihost", False, "initialise jax.distributed even when no multi-process "
                                  "launch is detected (one process per host)")
    flags.mark_flags_as_required(["config"])

    def main(args) -> None:
        if len(args) > 1:
            raise app.UsageError(f"unexpected arguments {args[1:]}; settings go through --config.<field>=...")
        logs.quiet_unless_asked()
        initialize_distributed(force=multihost.value)
        compile_cache.setup(config.value)
        run_or_exit(job, config.value, workdir.value, prog=prog)

    app.run(main, argv=config_files.resolve_argv(argv))
