"""jtinker: a post-training runtime in JAX that speaks the Tinker API."""

__version__ = "0.1.0"
