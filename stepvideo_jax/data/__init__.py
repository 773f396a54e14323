"""Data: grain pipelines, the precompute job, synthetic sets."""
