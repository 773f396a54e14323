"""Train the DiT with flow matching: `python -m stepvideo_jax.train --config configs/train/<name>.py`.

Config fields can be overridden on the command line (`--config.total_steps=100`); `--workdir`
overrides `config.workdir`. Re-running the same command resumes from the last complete checkpoint.
On a pod or cluster pass `--multihost` on every host (calls `jax.distributed.initialize()`, which
reads the coordinator from the TPU/SLURM environment).
"""
from __future__ import annotations

from absl import app, flags
from ml_collections import config_flags

from stepvideo_jax import config_files, logs

_CONFIG = config_flags.DEFINE_config_file("config", None, "training config file (configs/train/*.py)",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "run directory (checkpoints, metrics); default config.workdir")
_MULTIHOST = flags.DEFINE_bool("multihost", False, "initialise jax.distributed (one process per host)")


def main(argv) -> None:
    del argv
    logs.quiet_unless_asked()
    import jax

    from stepvideo_jax.training.failure import run_or_exit
    from stepvideo_jax import compile_cache
    from stepvideo_jax.training.loop import train

    if _MULTIHOST.value:
        jax.distributed.initialize()
    compile_cache.setup(_CONFIG.value)
    run_or_exit(train, _CONFIG.value, _WORKDIR.value, prog="train")


def cli() -> None:
    """The `stepvideo-train` console script (a shipped `--config` resolves from any directory)."""
    flags.mark_flags_as_required(["config"])
    app.run(main, argv=config_files.resolve_argv())


if __name__ == "__main__":
    cli()
