"""Who is asking, and whether they may: API keys, the page's session cookie, rate limits.

`serve.auth` sets the policy (docs/SERVING.md, "Identity and abuse"):
- `none`: nobody is identified (identity ""); the local default, allowed on a loopback host only.
- `keys`: every generation and every feedback event carries `Authorization: Bearer <key>`, a key
  made by `mode=keys`; the identity is `key:<key id>`.
- `keys_or_session`: a key as above, or else the anonymous session cookie that `GET /` (the page)
  issues: `<session id>.<issued at>.<HMAC>`, signed with a secret kept in the store (so replicas
  share it); the identity is `session:<session id>`.

Keys are 32 random bytes, so a plain SHA-256 is enough to store them (a slow password hash guards
guessable secrets; a 256-bit one is not guessable). `Gate.admit` runs per request, before the body
is read: the client address's token bucket first (it also slows key guessing), then the identity,
then the identity's bucket. Refusals are `ServiceError`s: 401 with `WWW-Authenticate`, 429 with
`Retry-After`.

New identities cost something (docs/SERVING.md, "Threat model"): a client address (an IPv6
address by its /64, which one subscriber holds whole) gets at most
`serve.sessions_per_address_per_day` new sessions, and a session's votes count only once it is
older than `serve.young_seconds` (the cookie says when it was issued) and was shown
`serve.young_impressions` answers. Addresses are stored only as a keyed hash (`Gate.address_key`,
HMAC-SHA256 with a secret of the store), so the store shows bursts from one address without
holding the address. `Gate.refresh` re-reads the secrets: after `mode=keys
--config.api_keys.action=rotate_sessions`, every session signed before is refused.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import ipaddress
import secrets
import time

from rlhb_jax.serving.config import ServeConfig
from rlhb_jax.serving.errors import ServiceError
from rlhb_jax.serving.limits import RateLimiter, retry_after
from rlhb_jax.serving.store import FeedbackStore

SESSION_COOKIE = "rlhb_session"
KEY_PREFIX = "rlhb-"
SESSION_SECRET = "session_secret"
ADDRESS_SECRET = "address_secret"
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


def network_of(address: str) -> str:
  """The unit an address limit counts: an IPv4 address, or an IPv6 address's /64 (one subscriber
  gets a whole /64, so counting IPv6 addresses one by one would limit nothing)."""
  try:
    ip = ipaddress.ip_address(address)
  except ValueError:
    return address
  if ip.version == 6 and ip.ipv4_mapped is not None:
    return str(ip.ipv4_mapped)
  if ip.version == 6:
    return str(ipaddress.ip_network(f"{ip}/64", strict=False))
  return str(ip)


@dataclasses.dataclass(frozen=True)
class Caller:
  """Who made a request: `identity` ("" = nobody identified) from client address `address`;
  `issued` is the time its session was issued (None: no session, e.g. an API key)."""

  identity: str
  address: str
  issued: float | None = None

  @property
  def is_key(self) -> bool:
    return self.identity.startswith("key:")


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

  def check(self, cookie: str | None, now: float | None = None) -> tuple[str, float] | None:
    """`("session:<id>", issued at)` if `cookie` is one this server signed and it has not expired,
    else None. Never raises, whatever the cookie holds."""
    if not cookie or not cookie.isascii() or cookie.count(".") != 2:
      return None
    sid, issued, signature = cookie.split(".")
    if not hmac.compare_digest(signature, self._sign(f"{sid}.{issued}")):
      return None
    now = time.time() if now is None else now
    if not issued.isdigit() or now - int(issued) > self.max_age:
      return None
    return f"session:{sid}", float(issued)

  def identity(self, cookie: str | None, now: float | None = None) -> str | None:
    """`session:<id>` if `cookie` is valid (see `check`), else None."""
    checked = self.check(cookie, now)
    return None if checked is None else checked[0]


class Gate:
  """Rate limits and the identity policy of `serve.auth` in front of the service's endpoints."""

  def __init__(self, config: ServeConfig, store: FeedbackStore):
    self.config = config
    self.store = store
    self.by_identity = RateLimiter(config.identity_rate, config.identity_burst)
    self.by_address = RateLimiter(*config.address_limit)
    self.sessions = None
    self._address_secret = b""
    self.refresh()

  def refresh(self) -> None:
    """(Re-)reads the store's secrets: a rotated session secret refuses every older session."""
    self._address_secret = self.store.secret(ADDRESS_SECRET).encode()
    if self.config.auth == "keys_or_session":
      self.sessions = Sessions(
        self.store.secret(SESSION_SECRET), self.config.session_max_age_seconds
      )

  def address_key(self, address: str) -> str:
    """What the store keeps of a client address: a keyed hash of its network (`network_of`)."""
    if not address:
      return ""
    return hmac.new(self._address_secret, network_of(address).encode(), "sha256").hexdigest()[:16]

  def limit_address(self, address: str) -> None:
    """429 when the client address is over its rate (`serve.address_rate`)."""
    self._take(self.by_address, f"address {address}", network_of(address))

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
    identity, issued = self.identify(authorization, cookie)
    if identity:
      self._take(self.by_identity, identity, identity)
    return Caller(identity, address, issued)

  def identify(self, authorization: str | None, cookie: str | None) -> tuple[str, float | None]:
    """`(identity, session issued at)`: ("", None) with serve.auth=none; a key has no issue time."""
    if self.config.auth == "none":
      return "", None
    if authorization:
      scheme, _, key = authorization.partition(" ")
      if scheme.lower() != "bearer" or not key.strip():
        raise ServiceError(401, "Authorization must be 'Bearer <API key>'", _CHALLENGE)
      key_id = self.store.key_id(hash_key(key.strip()))
      if key_id is None:
        raise ServiceError(401, "API key not recognised, or revoked", _CHALLENGE)
      return f"key:{key_id}", None
    if self.sessions is not None:
      checked = self.sessions.check(cookie)
      if checked is not None:
        return checked
      raise ServiceError(
        401, "this server needs an API key or a session (open / to get one)", _CHALLENGE
      )
    raise ServiceError(401, "this server needs an API key: Authorization: Bearer <key>", _CHALLENGE)

  def is_young(self, caller: Caller, now: float | None = None) -> bool:
    """Whether `caller`'s session is too recent for its votes to count (keys never are)."""
    if caller.issued is None:
      return False
    now = time.time() if now is None else now
    return now - caller.issued < self.config.young_seconds

  def page_session(self, cookie: str | None, address: str) -> str | None:
    """A new session cookie for the page when sessions are on and `cookie` is not a valid one;
    429 when `address` had its `serve.sessions_per_address_per_day` already."""
    if self.sessions is None or self.sessions.check(cookie) is not None:
      return None
    cap = self.config.sessions_per_address_per_day
    if not self.store.mint_session(self.address_key(address), cap):
      raise ServiceError(
        429,
        f"this address had its {cap} new sessions of the day; use the session you have, or "
        "come back tomorrow",
        {"Retry-After": "3600"},
      )
    return self.sessions.issue()
