"""rlhb_jax: aligning LLMs with online human behaviors (RLHB) in JAX and Flax NNX."""

__version__ = "0.1.0"
