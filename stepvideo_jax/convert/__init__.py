"""Official PyTorch release -> Orbax checkpoints: readers, per-component key maps, the CLI."""
