"""Append-only, crash-safe store of served responses and the behavior events users send back.

Two tables (schema in docs/SERVING.md): `responses`, one row per answer the server gave, and
`events`, one row per behavior event, unique on `event_id` so a retried POST is stored once. Every
row gets a monotonically increasing `seq`; the trainer keeps a cursor `{"responses": int, "events":
int}` (the last `seq` it consumed from each table) in its checkpoint and asks `read_new(cursor)` for
what came after. Writes are serialised (SQLite has one writer; on PostgreSQL a transaction-scoped
advisory lock does it), so `seq` order is commit order and a reader never sees seq 11 before seq 10
is visible: a cursor saved with the model therefore gives exactly-once consumption across restarts.

SQLite (the default, `DIR/feedback.db`) runs in WAL mode with `synchronous=FULL`: a commit returns
only once the WAL is on disk, so an event acknowledged with 200 survives a process kill and a power
cut. `synchronous=NORMAL` is also safe against process kills (the WAL is in the OS page cache) but
may lose the last commits on power loss; it is a config option for throughput-bound users.

Identities (docs/SERVING.md, "Identity and abuse"): a response records who asked for it, `shown`
records every identity shown a response, and an event from an identity is accepted only for a
response it was shown, and counts only as that identity's one vote of its type on the response.
API keys are kept as hashes in `api_keys`. The SQL and the schema are in `sql.py`.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import logging
import os
import threading
import uuid
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from rlhb_jax.serving import sql
from rlhb_jax.serving.records import (
  EventRow,
  Feed,
  KeyRow,
  NotShownError,
  ResponseRow,
  UnknownResponseError,
  check_cursor,
)

T = TypeVar("T")
log = logging.getLogger(__name__)


def _utc_now() -> str:
  now = datetime.datetime.now(datetime.UTC)
  return now.isoformat(timespec="milliseconds").replace("+00:00", "Z")


class FeedbackStore:
  """Served responses and behavior events behind one DB-API connection (thread-safe).

  Open with `open_store`. Producers call `add_responses` / `add_event`; the trainer calls
  `read_new(cursor)` and keeps the returned cursor in its checkpoint.
  """

  def __init__(
    self, conn: Any, dialect: sql.Dialect, where: str, connect: Callable[[], Any] | None = None
  ):
    self._conn = conn
    self._connect = connect  # reopens a connection the database server dropped
    self._closed = False
    self._dialect = dialect
    self._lock = threading.Lock()
    self.where = where  # path or URL without credentials, for messages
    try:
      self._create_schema()
    except BaseException:
      conn.close()  # e.g. a schema version this code does not read
      raise

  # -- plumbing -----------------------------------------------------------------------------------

  def _execute(self, statement: str, params: Sequence[Any] = ()) -> Any:
    return self._conn.execute(self._dialect.sql(statement), tuple(params))

  def _reconnect_if_dropped(self) -> None:
    """Opens a new connection if the database server dropped the current one.

    A PostgreSQL restart or a terminated backend breaks the connection: the call that saw it fails
    (answered 500; a client retries with the same event id), the next one gets a new connection.
    """
    if self._connect is not None and not self._closed and getattr(self._conn, "broken", False):
      log.warning("%s: connection lost; reconnecting", self.where)
      self._conn = self._connect()

  def _rollback(self) -> None:
    with contextlib.suppress(Exception):  # a dropped connection cannot roll back, nor needs to
      self._conn.rollback()

  def _write(self, body: Callable[[], T]) -> T:
    """Runs `body()` in one serialised write transaction and commits it."""
    with self._lock:
      self._reconnect_if_dropped()
      try:
        self._execute(self._dialect.write_lock)
        result = body()
        self._conn.commit()
      except BaseException:
        self._rollback()
        raise
      return result

  def _read(self, statement: str, params: Sequence[Any] = ()) -> list[tuple]:
    with self._lock:
      self._reconnect_if_dropped()
      try:
        rows = self._execute(statement, params).fetchall()
        self._conn.commit()  # ends the read snapshot (a no-op in SQLite autocommit mode)
      except BaseException:
        self._rollback()
        raise
      return rows

  def _create_schema(self) -> None:
    self._write(lambda: sql.create_or_upgrade(self._execute, self._dialect, self.where))

  def _one(self, statement: str, params: Sequence[Any] = ()) -> tuple | None:
    return self._execute(statement, params).fetchone()

  # -- producers ----------------------------------------------------------------------------------

  def add_responses(
    self,
    queries: Sequence[str],
    behaviors: Sequence[str | None],
    responses: Sequence[str],
    model_step: int,
    identities: Sequence[str] | None = None,
  ) -> list[str]:
    """Records a batch of served responses in one transaction; returns their new ids.

    `identities[i]` asked for response i ("" or None: nobody identified); it is recorded as shown
    the response, so its feedback on it is accepted.
    """
    identities = [""] * len(queries) if identities is None else list(identities)
    if not len(queries) == len(behaviors) == len(responses) == len(identities):
      raise ValueError("add_responses: queries, behaviors, responses, identities differ in length")
    ids = [uuid.uuid4().hex for _ in queries]
    now = _utc_now()
    rows = zip(ids, queries, behaviors, responses, identities, strict=True)

    def insert():
      for rid, query, behavior, response, identity in rows:
        self._execute(
          "INSERT INTO responses (id, query, behavior, response, model_step, created_at, "
          "identity) VALUES (?, ?, ?, ?, ?, ?, ?)",
          (rid, query, behavior, response, int(model_step), now, identity),
        )
        if identity:
          self._execute(
            "INSERT INTO shown (response_id, identity, created_at) VALUES (?, ?, ?)",
            (rid, identity, now),
          )

    self._write(insert)
    return ids

  def show(self, response_id: str, identity: str) -> ResponseRow:
    """The stored response, recording that `identity` was shown it (once; "" records nothing).

    Raises:
      UnknownResponseError: `response_id` was never served.
    """

    def read_and_record():
      row = self._one(
        "SELECT seq, id, query, behavior, response, model_step, created_at, identity "
        "FROM responses WHERE id = ?",
        (response_id,),
      )
      if row is None:
        raise UnknownResponseError(response_id)
      if identity:
        self._execute(
          "INSERT INTO shown (response_id, identity, created_at) VALUES (?, ?, ?) "
          "ON CONFLICT (response_id, identity) DO NOTHING",
          (response_id, identity, _utc_now()),
        )
      return ResponseRow(*row)

    return self._write(read_and_record)

  def add_event(
    self,
    response_id: str,
    event_id: str,
    type: str,
    value: float = 1.0,
    identity: str = "",
    reaction_types: Sequence[str] = (),
  ) -> bool:
    """Records one behavior event; True if it counts, False if not.

    The first event with a given `event_id` wins; a repeat changes nothing, whatever it carries.
    From an identified sender (`identity` not ""), an event counts as its one vote of `type` on the
    response: a second one of that type is stored with `counted` false (a repeated vote, kept so
    that its volume shows); of `reaction_types` (likes, dislikes) the identity holds one vote, and
    a different reaction replaces the one it holds (`replaces`, its seq). Unidentified events
    (`identity` "", serve.auth=none) all count.

    Raises:
      UnknownResponseError: `response_id` was never served.
      NotShownError: `identity` was never shown `response_id`.
    """
    if not identity:
      return self._write(lambda: self._insert_unidentified(response_id, event_id, type, value))
    group = tuple(reaction_types) if type in reaction_types else (type,)

    def insert():
      if self._one("SELECT 1 FROM responses WHERE id = ?", (response_id,)) is None:
        raise UnknownResponseError(response_id)
      shown = "SELECT 1 FROM shown WHERE response_id = ? AND identity = ?"
      if self._one(shown, (response_id, identity)) is None:
        raise NotShownError(f"{identity} was not shown response {response_id}")
      if self._one("SELECT 1 FROM events WHERE event_id = ?", (event_id,)) is not None:
        return False
      held = self._one(
        "SELECT seq, type FROM events WHERE response_id = ? AND identity = ? AND counted = 1 "
        f"AND type IN ({', '.join('?' * len(group))}) ORDER BY seq DESC LIMIT 1",
        (response_id, identity, *group),
      )
      counted = held is None or held[1] != type
      self._execute(
        "INSERT INTO events (event_id, response_id, type, value, created_at, identity, counted, "
        "replaces) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        (
          event_id,
          response_id,
          type,
          float(value),
          _utc_now(),
          identity,
          int(counted),
          held[0] if counted and held is not None else None,
        ),
      )
      return counted

    return self._write(insert)

  def _insert_unidentified(self, response_id: str, event_id: str, type: str, value: float) -> bool:
    # One statement on the common path (a new event for a known response): a round trip less on
    # PostgreSQL. Nothing inserted means a duplicate, or an unknown response (checked then).
    cur = self._execute(
      "INSERT INTO events (event_id, response_id, type, value, created_at) "
      "SELECT ?, ?, ?, ?, ? WHERE EXISTS (SELECT 1 FROM responses WHERE id = ?) "
      "ON CONFLICT (event_id) DO NOTHING",
      (event_id, response_id, type, float(value), _utc_now(), response_id),
    )
    if cur.rowcount == 1:
      return True
    if self._one("SELECT 1 FROM responses WHERE id = ?", (response_id,)) is None:
      raise UnknownResponseError(response_id)
    return False

  # -- API keys (their secrets are never stored: `key_hash` is a SHA-256, see auth.py) ------------

  def add_key(self, name: str, key_hash: str) -> str:
    """Stores a new active key under `name`; returns its id (public, names it in lists)."""
    key_id = uuid.uuid4().hex[:12]
    self._write(
      lambda: self._execute(
        "INSERT INTO api_keys (id, name, key_hash, created_at) VALUES (?, ?, ?, ?)",
        (key_id, name, key_hash, _utc_now()),
      )
    )
    return key_id

  def list_keys(self) -> list[KeyRow]:
    rows = self._read("SELECT id, name, created_at, revoked_at FROM api_keys ORDER BY created_at")
    return [KeyRow(*row) for row in rows]

  def revoke_key(self, key_id: str) -> bool:
    """Revokes the key; False if no active key has that id."""

    def revoke():
      cur = self._execute(
        "UPDATE api_keys SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL",
        (_utc_now(), key_id),
      )
      return cur.rowcount == 1

    return self._write(revoke)

  def key_id(self, key_hash: str) -> str | None:
    """The id of the active key with this hash, or None (unknown or revoked)."""
    rows = self._read(
      "SELECT id FROM api_keys WHERE key_hash = ? AND revoked_at IS NULL", (key_hash,)
    )
    return rows[0][0] if rows else None

  def secret(self, name: str, make: Callable[[], str]) -> str:
    """A server secret kept in `store_meta` (made once with `make`), shared by every replica."""

    def get_or_make():
      self._execute(
        "INSERT INTO store_meta (key, value) VALUES (?, ?) ON CONFLICT (key) DO NOTHING",
        (name, make()),
      )
      return self._one("SELECT value FROM store_meta WHERE key = ?", (name,))[0]

    return self._write(get_or_make)

  # -- consumers ----------------------------------------------------------------------------------

  def counts(self) -> dict[str, int]:
    """`{"responses": n, "events": m}`: rows stored so far."""
    (row,) = self._read(
      "SELECT (SELECT COUNT(*) FROM responses), (SELECT COUNT(*) FROM events)", ()
    )
    return {"responses": int(row[0]), "events": int(row[1])}

  def read_new(
    self, cursor: dict[str, int] | None = None, limit: int | None = None
  ) -> tuple[Feed, dict[str, int]]:
    """Rows committed after `cursor`, and the cursor to pass next time.

    Args:
      cursor: `{"responses": seq, "events": seq}` as returned by the previous call (or
        `start_cursor()` / None for everything). Keep it in the checkpoint next to the model that
        consumed the rows: restoring both together gives exactly-once consumption.
      limit: at most this many rows from each table (None = all); the cursor then advances only
        past the rows returned.

    Returns:
      `(feed, new_cursor)`; `feed.events` carry their response's query, text and condition.
    """
    cursor = check_cursor(cursor)
    tail = "" if limit is None else f" LIMIT {int(limit)}"
    responses = [
      ResponseRow(*row)
      for row in self._read(
        "SELECT seq, id, query, behavior, response, model_step, created_at, identity "
        "FROM responses "
        "WHERE seq > ? ORDER BY seq" + tail,
        (cursor["responses"],),
      )
    ]
    events = [
      EventRow(*row[:11], bool(row[11]), row[12])
      for row in self._read(
        "SELECT e.seq, e.event_id, e.response_id, e.type, e.value, e.created_at, "
        "r.query, r.response, r.behavior, r.model_step, e.identity, e.counted, e.replaces "
        "FROM events e JOIN responses r ON r.id = e.response_id "
        "WHERE e.seq > ? ORDER BY e.seq" + tail,
        (cursor["events"],),
      )
    ]
    new_cursor = {
      "responses": responses[-1].seq if responses else cursor["responses"],
      "events": events[-1].seq if events else cursor["events"],
    }
    return Feed(responses, events), new_cursor

  def close(self) -> None:
    with self._lock:
      self._closed = True
      self._conn.close()

  def __enter__(self) -> FeedbackStore:
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def open_store(
  url: str = "", workdir: str | os.PathLike = ".", synchronous: str = "FULL"
) -> FeedbackStore:
  """Opens (creating if needed) the store named by `url`.

  Args:
    url: "" = `workdir/feedback.db`; a file path or `sqlite:///path` = SQLite there;
      `postgresql://...` (or `postgres://`) = PostgreSQL with the same schema (needs `psycopg`).
    workdir: where the default SQLite file lives.
    synchronous: SQLite durability, "FULL" or "NORMAL" (see the module docstring).
  """
  if url.startswith(("postgresql://", "postgres://")):
    connect = functools.partial(sql.connect_postgres, url)
    return FeedbackStore(connect(), sql.POSTGRES, url.split("@")[-1], connect)
  if url.startswith("sqlite:///"):
    path = url[len("sqlite:///") :]  # sqlite:///rel.db is relative, sqlite:////abs.db absolute
  elif "://" in url:
    raise ValueError(f"store_url {url!r}: expected a path, sqlite:///path or postgresql://...")
  else:
    path = url or os.path.join(os.fspath(workdir), "feedback.db")
  return FeedbackStore(sql.connect_sqlite(path, synchronous), sql.SQLITE, path)
