"""affect_jax: per-frame valence/arousal, expression and action units from face video, in JAX."""

__version__ = "0.1.0"
