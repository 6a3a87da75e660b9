"""Online serving: the feedback store and the HTTP server (docs/SERVING.md)."""

from rlhb_jax.serving.config import ServeConfig
from rlhb_jax.serving.server import EchoPolicy, FeedbackServer, Policy, make_server, run_server
from rlhb_jax.serving.store import (
  EventRow,
  Feed,
  FeedbackStore,
  ResponseRow,
  UnknownResponseError,
  aggregate_records,
  open_store,
  start_cursor,
)

__all__ = [
  "EchoPolicy",
  "EventRow",
  "Feed",
  "FeedbackServer",
  "FeedbackStore",
  "Policy",
  "ResponseRow",
  "ServeConfig",
  "UnknownResponseError",
  "aggregate_records",
  "make_server",
  "open_store",
  "run_server",
  "start_cursor",
]
