"""Serving section of the config: the HTTP server, the feedback store, who may post to it."""

import dataclasses
import ipaddress

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


AUTH_POLICIES = ("none", "keys", "keys_or_session")


@dataclasses.dataclass(frozen=True)
class IngestConfig:
  """How a consumer of the store (mode=online, mode=inspect_logs) screens identified events
  (docs/SERVING.md, "Identity and abuse"); unidentified events (serve.auth=none) pass as is."""

  # Cap: aggregation counts at most one vote per identity, response and type (of likes and
  # dislikes, the latest), whatever the store let through. False: every event the store counted.
  cap: bool = True
  # Quarantine the events of identities whose volume or agreement is anomalous (counted, written
  # to a file, left out of the records). False: only report them.
  quarantine: bool = True
  # Anomalous volume: more events than volume_factor x the median identity's, and > min_volume.
  volume_factor: float = 10.0
  min_volume: int = 100
  # Anomalous agreement: of the responses an identity reacted to (like / dislike) that others
  # reacted to as well, at least min_compared, it agrees with their majority on < min_agreement.
  min_agreement: float = 0.2
  min_compared: int = 10
  # Bursts, whose identities are flagged: at least burst_identities young or one-event identities
  # reacting to one answer (the same query and text, whatever its response id), or at least
  # address_identities young sessions from one address (its keyed hash).
  burst_identities: int = 10
  address_identities: int = 20

  def __post_init__(self):
    if self.volume_factor < 1 or self.min_volume < 0 or self.min_compared < 1:
      raise ValueError(
        "config.serve.ingest: volume_factor must be >= 1, min_volume >= 0, min_compared >= 1"
      )
    if self.burst_identities < 2 or self.address_identities < 2:
      raise ValueError("config.serve.ingest: burst_identities and address_identities must be >= 2")
    if not 0 <= self.min_agreement <= 1:
      raise ValueError(f"config.serve.ingest.min_agreement={self.min_agreement}: expected 0..1")


AUTO = -1.0
PUBLIC_ADDRESS_RATE = 5.0  # serve.address_rate when it is AUTO and the host is not loopback


def is_loopback(host: str) -> bool:
  if host == "localhost":
    return True
  try:
    return ipaddress.ip_address(host).is_loopback
  except ValueError:
    return False


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

  # Who may generate and give feedback (docs/SERVING.md, "Identity and abuse"). none: nobody is
  # identified (the local default; loopback hosts only); keys: an API key in `Authorization:
  # Bearer ...` (made with mode=keys); keys_or_session: a key, or the signed session cookie that
  # the feedback page gets from GET /.
  auth: str = "none"
  session_max_age_seconds: float = 30 * 86400.0  # a session cookie older than this is refused
  # The cookie's Secure flag (clients come over HTTPS); required on a host beyond loopback.
  cookie_secure: bool = False
  # Proxies trusted to name the client in X-Forwarded-For (comma-separated IPs; "*" = any, which
  # lets every client choose its address: refused while an address limit is on);
  # "" = none: the client address is the TCP peer (behind a proxy: the proxy, for every client).
  forwarded_allow_ips: str = ""
  # Token buckets (refill per second, bucket size); a request takes one token; rate 0 = no limit.
  identity_rate: float = 20.0  # per identity (API key or session)
  identity_burst: int = 100
  # Per client address (an IPv6 address by its /64): what an attacker cannot multiply cheaply.
  # -1 = auto: no limit on a loopback host, PUBLIC_ADDRESS_RATE (5/s) beyond it.
  address_rate: float = AUTO
  address_burst: int = 50
  # New sessions (GET / without a valid cookie) per client address (IPv6: per /64) per day; more
  # get 429. 0 = no cap. Counted in the store, so replicas share the cap.
  sessions_per_address_per_day: int = 20
  # A session's votes are stored but not counted (never, whatever it does later) while it is
  # younger than this or has been shown fewer than young_impressions answers. API keys, made by
  # the operator, are exempt.
  young_seconds: float = 3600.0
  young_impressions: int = 3
  max_value: float = 86400.0  # the largest value of a valued event (dwell_seconds: a day)
  # With identities: event types whose value is a measure (others are one vote, value 1), and
  # the types of which an identity's latest vote replaces its earlier one (a dislike after a like).
  valued_types: tuple[str, ...] = ("dwell_seconds",)
  reaction_types: tuple[str, ...] = ("likes", "dislikes")
  ingest: IngestConfig = IngestConfig()

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
    if self.auth not in AUTH_POLICIES:
      raise ValueError(f"config.serve.auth={self.auth!r}: expected one of {AUTH_POLICIES}")
    if self.auth == "none" and not is_loopback(self.host):
      raise ValueError(
        f"config.serve.host={self.host!r} with config.serve.auth=none: anyone who reaches the "
        "server could post behaviors as anyone; set config.serve.auth=keys or keys_or_session "
        "(docs/SERVING.md, 'A public deployment'), or serve on 127.0.0.1"
      )
    for rate, burst in ((self.identity_rate, self.identity_burst), self.address_limit):
      if rate < 0 or (rate > 0 and burst < 1):
        raise ValueError(
          "config.serve: identity_rate and address_rate must be >= 0 (or -1: auto), with a "
          "burst >= 1"
        )
    if self.forwarded_allow_ips.strip() == "*" and (
      self.address_limit[0] > 0 or self.sessions_per_address_per_day > 0
    ):
      raise ValueError(
        "config.serve.forwarded_allow_ips='*' lets every client name its own address in "
        "X-Forwarded-For, so the address limits (address_rate, sessions_per_address_per_day) "
        "would limit nothing: name the proxy's address instead"
      )
    if self.auth == "keys_or_session" and not self.cookie_secure and not is_loopback(self.host):
      raise ValueError(
        f"config.serve.host={self.host!r} with sessions: set config.serve.cookie_secure=true "
        "(and serve over HTTPS) so that the session cookie never travels in clear"
      )
    if min(self.sessions_per_address_per_day, self.young_seconds, self.young_impressions) < 0:
      raise ValueError(
        "config.serve: sessions_per_address_per_day, young_seconds, young_impressions must be >= 0"
      )
    if not self.max_value > 0:
      raise ValueError(f"config.serve.max_value={self.max_value}: must be > 0")
    for name in ("valued_types", "reaction_types"):
      unknown = set(getattr(self, name)) - set(self.feedback_types)
      if unknown:
        raise ValueError(
          f"config.serve.{name}: {sorted(unknown)} not in feedback_types {self.feedback_types}"
        )
    if self.session_max_age_seconds <= 0:
      raise ValueError("config.serve.session_max_age_seconds must be > 0")

  @property
  def address_limit(self) -> tuple[float, int]:
    """(rate, burst) per client address, `address_rate=-1` resolved for the host."""
    if self.address_rate != AUTO:
      return self.address_rate, self.address_burst
    return 0.0 if is_loopback(self.host) else PUBLIC_ADDRESS_RATE, self.address_burst
