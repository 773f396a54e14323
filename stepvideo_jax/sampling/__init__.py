"""Sampling: the flow-matching sampler, the prompt -> video pipeline, video files."""
