"""Training data: the on-disk format of pre-encoded samples, the grain pipeline, the precompute job."""
