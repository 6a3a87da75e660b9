"""Test session set-up: 8 fake CPU devices (before the JAX backend starts) and shared fixtures."""

import os

os.environ.setdefault("XLA_FLAGS", "")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
