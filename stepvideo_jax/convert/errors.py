"""The one error type of checkpoint files, raised by every reader and writer of weights.

It sits at the bottom of `convert/` so that the release readers, the path checks, the Orbax
component I/O, `stepvideo_jax.checkpoints` and the training checkpointer all raise the same class;
a command names it in one line (generate: exit 2; training: `training.failure`).
"""


class CheckpointError(ValueError):
    """A checkpoint is missing, corrupt, unsafe, does not match the model, or cannot be saved or
    restored (a release's files, a converted checkpoint, a training run's steps); one-line message."""
