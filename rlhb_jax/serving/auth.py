"""Who is asking, and whether they may: API keys, the page's session cookie, rate limits.

`serve.auth` sets the policy (docs/SERVING.md, "Identity and abuse"):
- `none`: nobody is identified (identity ""); the local default, allowed on a loopback host only.
- `keys`: every generation and every feedback event carries `Authorization: Bearer <key>`, a key
  made by `mode=keys`; the identity is `key:<key id>`.
- `keys_or_session`: a key as above, or else the anonymous session cookie that `GET /` (the page)
  issues: `<session id>.<issued at>.<HMAC>`, signed with a secret kept in the store (so replicas
  share it); the identity is `session:<session id>`.

Keys are 32 random bytes, so a plain SHA-256 is enough to store them (a slow password hash guards
guessable secrets; a 256-bit one is not guessable). `Gate.admit` runs per request: the client
address's token bucket first (it also slows key guessing), then the identity, then the identity's
bucket. Refusals are `ServiceError`s: 401 with `WWW-Authenticate`, 429 with `Retry-After`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import secrets
import time

from rlhb_jax.serving.config import ServeConfig
from rlhb_jax.serving.errors import ServiceError
from rlhb_jax.serving.limits import RateLimiter, retry_after
from rlhb_jax.serving.store import FeedbackStore

SESSION_COOKIE = "rlhb_session"
KEY_PREFIX = "rlhb-"
_SECRET_NAME = "session_secret"
_CHALLENGE = {"WWW-Authenticate": 'Bearer realm="rlhb"'}


def new_key() -> str:
  """A fresh API key: `rlhb-` and 43 URL-safe characters (256 random bits)."""
  return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_key(key: str) -> str:
  return hashlib.sha256(key.encode()).hexdigest()


def add_key(store: FeedbackStore, name: str) -> tuple[str, str]:
  """Makes and stores a key; returns `(key id, key)`. The key itself is not kept anywhere."""
  if not name.strip():
    raise ValueError("a key needs a name (who or what holds it)")
  key = new_key()
  return store.add_key(name, hash_key(key)), key


@dataclasses.dataclass(frozen=True)
class Caller:
  """Who made a request: `identity` ("" = nobody identified) from client address `address`."""

  identity: str
  address: str


class Sessions:
  """Signs and checks the page's anonymous session cookies."""

  def __init__(self, secret: str, max_age: float):
    self._secret = secret.encode()
    self.max_age = max_age

  def _sign(self, payload: str) -> str:
    return hmac.new(self._secret, payload.encode(), hashlib.sha256).hexdigest()[:32]

  def issue(self, now: float | None = None) -> str:
    payload = f"{secrets.token_hex(16)}.{int(time.time() if now is None else now)}"
    return f"{payload}.{self._sign(payload)}"

  def identity(self, cookie: str | None, now: float | None = None) -> str | None:
    """`session:<id>` if `cookie` is one this server signed and it has not expired, else None."""
    if not cookie or cookie.count(".") != 2:
      return None
    sid, issued, signature = cookie.split(".")
    if not hmac.compare_digest(signature, self._sign(f"{sid}.{issued}")):
      return None
    now = time.time() if now is None else now
    if not issued.isdigit() or now - int(issued) > self.max_age:
      return None
    return f"session:{sid}"


class Gate:
  """Rate limits and the identity policy of `serve.auth` in front of the service's endpoints."""

  def __init__(self, config: ServeConfig, store: FeedbackStore):
    self.config = config
    self.store = store
    self.by_identity = RateLimiter(config.identity_rate, config.identity_burst)
    self.by_address = RateLimiter(config.address_rate, config.address_burst)
    self.sessions = None
    if config.auth == "keys_or_session":
      self.sessions = Sessions(
        store.secret(_SECRET_NAME, lambda: secrets.token_hex(32)), config.session_max_age_seconds
      )

  def limit_address(self, address: str) -> None:
    """429 when the client address is over its rate (`serve.address_rate`)."""
    self._take(self.by_address, f"address {address}", address)

  def _take(self, limiter: RateLimiter, who: str, key: str) -> None:
    wait = limiter.take(key)
    if wait > 0:
      raise ServiceError(
        429,
        f"rate limit: {who} is over {limiter.rate:g} requests/s (burst {limiter.burst}); "
        f"retry in {wait:.2f} s",
        {"Retry-After": retry_after(wait)},
      )

  def admit(self, address: str, authorization: str | None, cookie: str | None) -> Caller:
    """The caller of a generation or feedback request, or a 401 / 429 `ServiceError`."""
    self.limit_address(address)
    identity = self.identify(authorization, cookie)
    if identity:
      self._take(self.by_identity, identity, identity)
    return Caller(identity, address)

  def identify(self, authorization: str | None, cookie: str | None) -> str:
    if self.config.auth == "none":
      return ""
    if authorization:
      scheme, _, key = authorization.partition(" ")
      if scheme.lower() != "bearer" or not key.strip():
        raise ServiceError(401, "Authorization must be 'Bearer <API key>'", _CHALLENGE)
      key_id = self.store.key_id(hash_key(key.strip()))
      if key_id is None:
        raise ServiceError(401, "API key not recognised, or revoked", _CHALLENGE)
      return f"key:{key_id}"
    if self.sessions is not None:
      identity = self.sessions.identity(cookie)
      if identity is not None:
        return identity
      raise ServiceError(
        401, "this server needs an API key or a session (open / to get one)", _CHALLENGE
      )
    raise ServiceError(401, "this server needs an API key: Authorization: Bearer <key>", _CHALLENGE)

  def page_session(self, cookie: str | None) -> str | None:
    """A new session cookie for the page when sessions are on and `cookie` is not a valid one."""
    if self.sessions is None or self.sessions.identity(cookie) is not None:
      return None
    return self.sessions.issue()
