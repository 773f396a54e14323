"""Meshes, the logical-axis rules table, sequence parallelism."""
