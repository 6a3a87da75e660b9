"""Test session set-up: 8 fake CPU devices (before the JAX backend starts) and shared fixtures."""

import os

# The CPU backend only, here and in every subprocess a test starts: with libtpu installed (the dev
# requirements bring it for tests/test_aot.py) JAX would otherwise look for a TPU first and warn.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("XLA_FLAGS", "")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)

import pg  # noqa: E402  (tests/pg.py: a throwaway PostgreSQL cluster)
import pytest  # noqa: E402


@pytest.fixture(scope="session")
def pg_cluster():
  """One PostgreSQL cluster per test session (per xdist worker); skipped, with why, without one."""
  reason = pg.available()
  if reason is not None:
    pytest.skip(f"PostgreSQL unavailable: {reason}")
  cluster = pg.Cluster()
  yield cluster
  cluster.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request, tmp_path):
  """The URL of an empty feedback store: a SQLite file, then a fresh PostgreSQL database."""
  if request.param == "sqlite":
    return str(tmp_path / "feedback.db")
  return request.getfixturevalue("pg_cluster").new_database()
