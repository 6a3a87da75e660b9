"""The simulated online search environment: knowledge base, logging policy, users, annotators."""

from rlhb_jax.sim.config import STYLES, Annotator, Segment, SimConfig, UserModel
from rlhb_jax.sim.simulator import Simulator, write_large_log

__all__ = [
  "STYLES",
  "Annotator",
  "Segment",
  "SimConfig",
  "Simulator",
  "UserModel",
  "write_large_log",
]
