"""Video-DPO fine-tuning of the DiT: `python -m stepvideo_jax.train_dpo --config configs/dpo/<name>.py`.

The run is the training loop with the DPO objective of `training/dpo.py` (data, frozen reference,
LoRA or full fine-tuning, weight sources `config.dpo.policy_from` / `reference_from`: see there).
Re-running the same command resumes. `--workdir` overrides `config.workdir`. On a pod or cluster
run the same command on every host (`parallel.mesh.initialize_distributed`; `--multihost` forces it).
"""
from __future__ import annotations

from stepvideo_jax.training import command
from stepvideo_jax.training.dpo import train_dpo


def cli(argv=None) -> None:
    """The `stepvideo-train-dpo` console script (a shipped `--config` resolves from any directory)."""
    command.run(train_dpo, prog="train_dpo", config_help="DPO config file (configs/dpo/*.py)", argv=argv)


if __name__ == "__main__":
    cli()
