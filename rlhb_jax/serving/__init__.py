"""Online serving: the feedback store, the service logic and its HTTP server (docs/SERVING.md)."""

from rlhb_jax.serving.auth import Caller, add_key
from rlhb_jax.serving.config import IngestConfig, ServeConfig
from rlhb_jax.serving.http import FeedbackServer, make_server, run_server
from rlhb_jax.serving.records import (
  EventRow,
  Feed,
  KeyRow,
  NotShownError,
  ResponseRow,
  UnknownResponseError,
  aggregate_records,
  one_vote,
  start_cursor,
)
from rlhb_jax.serving.service import EchoPolicy, FeedbackService, Policy, ServiceError
from rlhb_jax.serving.store import FeedbackStore, open_store

__all__ = [
  "Caller",
  "EchoPolicy",
  "EventRow",
  "Feed",
  "FeedbackServer",
  "FeedbackService",
  "FeedbackStore",
  "IngestConfig",
  "KeyRow",
  "NotShownError",
  "Policy",
  "ResponseRow",
  "ServeConfig",
  "ServiceError",
  "UnknownResponseError",
  "add_key",
  "aggregate_records",
  "make_server",
  "one_vote",
  "open_store",
  "run_server",
  "start_cursor",
]
