"""Flow-matching training of the DiT: loss, optimizer, train state and step, checkpoints, metrics, loop."""
