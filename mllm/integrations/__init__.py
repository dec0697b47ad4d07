"""Adapters that let other tools drive mllm models (each imports its tool only when used)."""
