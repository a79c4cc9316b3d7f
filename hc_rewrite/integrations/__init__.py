"""Integrations with training engines (optional dependencies, imported on use)."""
