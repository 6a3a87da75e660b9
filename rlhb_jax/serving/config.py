"""Serving section of the config: the HTTP server and the feedback store."""

import dataclasses

DEFAULT_FEEDBACK_TYPES = (
  "clicks",
  "likes",
  "dislikes",
  "requeries",
  "impressions",
  "copies",
  "dwell_seconds",
  "shares",
)


@dataclasses.dataclass(frozen=True)
class ServeConfig:
  """Options of `mode=serve` (see docs/SERVING.md)."""

  # model: the run's newest generator; echo: a deterministic stand-in, no model (tests, smoke runs)
  policy: str = "model"

  host: str = "127.0.0.1"  # bind address; loopback only unless you mean to expose it
  port: int = 8080  # 0 = let the OS pick a free port (printed on start-up)
  max_body_bytes: int = 65536  # larger request bodies get 413 before they are read
  batch_max_size: int = 8  # generation requests answered by one policy call, at most
  batch_timeout_ms: float = 5.0  # after the first request, wait this long for more to batch
  generate_timeout_seconds: float = 60.0  # a request not answered by then gets 503
  store_url: str = ""  # "" = DIR/feedback.db; a path, sqlite:///path, or postgresql://...
  sqlite_synchronous: str = "FULL"  # FULL: a 200 survives power loss; NORMAL: only process crashes
  reload_poll_seconds: float = 10.0  # how often the policy is asked to pick up a newer checkpoint
  # Event types POST /v1/feedback accepts; anything else is a 422.
  feedback_types: tuple[str, ...] = DEFAULT_FEEDBACK_TYPES

  def __post_init__(self):
    if self.policy not in ("model", "echo"):
      raise ValueError(f"config.serve.policy={self.policy!r}: expected model or echo")
    if not 0 <= self.port <= 65535:
      raise ValueError(f"config.serve.port={self.port}: expected 0..65535")
    if self.max_body_bytes <= 0:
      raise ValueError(f"config.serve.max_body_bytes={self.max_body_bytes}: must be > 0")
    if self.batch_max_size < 1:
      raise ValueError(f"config.serve.batch_max_size={self.batch_max_size}: must be >= 1")
    if self.batch_timeout_ms < 0 or self.reload_poll_seconds <= 0:
      raise ValueError("config.serve: batch_timeout_ms must be >= 0, reload_poll_seconds > 0")
    if self.sqlite_synchronous not in ("FULL", "NORMAL"):
      raise ValueError(
        f"config.serve.sqlite_synchronous={self.sqlite_synchronous!r}: expected FULL or NORMAL"
      )
    if not self.feedback_types:
      raise ValueError("config.serve.feedback_types: must name at least one event type")
