"""Rate limits: one token bucket per key (an identity, or a client address).

A bucket holds at most `burst` tokens and refills at `rate` tokens per second; a request takes one
token, and a request that finds less than one is refused with the seconds until one is there (what
the server sends as `Retry-After`). Buckets that have refilled completely are forgotten when the
table grows past `max_keys`, since a full bucket and no bucket behave the same: memory stays
bounded whatever the number of keys an attacker makes up.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable


class RateLimiter:
  """Token buckets keyed by string; thread-safe. `rate <= 0` means no limit."""

  def __init__(
    self,
    rate: float,
    burst: int,
    max_keys: int = 100_000,
    clock: Callable[[], float] = time.monotonic,
  ):
    if rate > 0 and burst < 1:
      raise ValueError(f"a rate limit of {rate}/s needs a burst >= 1, got {burst}")
    self.rate, self.burst, self.max_keys = rate, burst, max_keys
    self._clock = clock
    self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, time of that count)
    self._lock = threading.Lock()

  def _tokens(self, key: str, now: float) -> float:
    tokens, then = self._buckets.get(key, (self.burst, now))
    return min(self.burst, tokens + (now - then) * self.rate)

  def take(self, key: str) -> float:
    """Takes a token for `key`: 0.0 if granted, else the seconds until one will be there."""
    if self.rate <= 0:
      return 0.0
    with self._lock:
      now = self._clock()
      tokens = self._tokens(key, now)
      if tokens < 1.0:
        self._buckets[key] = (tokens, now)
        return (1.0 - tokens) / self.rate
      self._buckets[key] = (tokens - 1.0, now)
      if len(self._buckets) > self.max_keys:
        self._forget_full(now)
      return 0.0

  def _forget_full(self, now: float) -> None:
    full = [k for k in self._buckets if self._tokens(k, now) >= self.burst]
    for k in full:
      del self._buckets[k]


def retry_after(seconds: float) -> str:
  """The `Retry-After` header value: whole seconds, rounded up, at least 1."""
  return str(max(1, math.ceil(seconds)))
