"""Flax NNX modules: DiT, Video-VAE, Step-LLM, Hunyuan-CLIP and their shared layers."""
