"""Online serving: the feedback store, the service logic and its HTTP server (docs/SERVING.md)."""

from rlhb_jax.serving.config import ServeConfig
from rlhb_jax.serving.http import FeedbackServer, make_server, run_server
from rlhb_jax.serving.records import (
  EventRow,
  Feed,
  ResponseRow,
  UnknownResponseError,
  aggregate_records,
  start_cursor,
)
from rlhb_jax.serving.service import EchoPolicy, FeedbackService, Policy, ServiceError
from rlhb_jax.serving.store import FeedbackStore, open_store

__all__ = [
  "EchoPolicy",
  "EventRow",
  "Feed",
  "FeedbackServer",
  "FeedbackService",
  "FeedbackStore",
  "Policy",
  "ResponseRow",
  "ServeConfig",
  "ServiceError",
  "UnknownResponseError",
  "aggregate_records",
  "make_server",
  "open_store",
  "run_server",
  "start_cursor",
]
