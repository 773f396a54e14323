"""Train the DiT with flow matching: `python -m stepvideo_jax.train --config configs/train/<name>.py`.

Config fields can be overridden on the command line (`--config.total_steps=100`); `--workdir`
overrides `config.workdir`. Re-running the same command resumes from the last complete checkpoint.
On a pod or cluster run the same command on every host: a multi-process launch is detected
(`parallel.mesh.initialize_distributed`; `--multihost` forces it) and `jax.distributed` started once.
The run itself: `training.loop.train`.
"""
from __future__ import annotations

from stepvideo_jax.training import command
from stepvideo_jax.training.loop import train


def cli(argv=None) -> None:
    """The `stepvideo-train` console script (a shipped `--config` resolves from any directory)."""
    command.run(train, prog="train", config_help="training config file (configs/train/*.py)", argv=argv)


if __name__ == "__main__":
    cli()
