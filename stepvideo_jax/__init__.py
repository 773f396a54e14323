"""stepvideo-jax: Step-Video-T2V (text-to-video, 30B) in JAX/Flax NNX."""
