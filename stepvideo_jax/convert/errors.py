"""The converter's one error type (kept apart so every reader and path check can raise it)."""


class CheckpointError(ValueError):
    """A source checkpoint is missing, corrupt, unsafe, or does not match the model."""
