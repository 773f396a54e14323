"""Meshes, the logical-axis rules table, ahead-of-time compilation helpers."""
