"""`ServiceError`: a request the serving logic refuses; http.py answers it with its status."""

from __future__ import annotations


class ServiceError(Exception):
  """A request the service refuses: answered as `{"error": message}` with `status` (and `headers`,
  e.g. `Retry-After` on a 429)."""

  def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
    super().__init__(message)
    self.status, self.message, self.headers = status, message, headers
