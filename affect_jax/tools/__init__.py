"""Command-line tools around affect_jax (weight import)."""
