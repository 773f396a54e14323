"""Evaluation tools: scoring generated videos against their prompts."""
