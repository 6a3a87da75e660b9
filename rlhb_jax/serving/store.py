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
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import functools
import logging
import os
import sqlite3
import threading
import uuid
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from rlhb_jax.serving.records import (
  EventRow,
  Feed,
  ResponseRow,
  UnknownResponseError,
  check_cursor,
)

T = TypeVar("T")
log = logging.getLogger(__name__)
SCHEMA_VERSION = 1
# Arbitrary constant naming the PostgreSQL advisory lock that serialises writers.
_PG_WRITE_LOCK = 0x726C6862

_DDL = (
  """CREATE TABLE IF NOT EXISTS store_meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
  )""",
  """CREATE TABLE IF NOT EXISTS responses (
    seq {serial},
    id TEXT NOT NULL UNIQUE,
    query TEXT NOT NULL,
    behavior TEXT,
    response TEXT NOT NULL,
    model_step BIGINT NOT NULL,
    created_at TEXT NOT NULL
  )""",
  """CREATE TABLE IF NOT EXISTS events (
    seq {serial},
    event_id TEXT NOT NULL UNIQUE,
    response_id TEXT NOT NULL REFERENCES responses (id),
    type TEXT NOT NULL,
    value {real} NOT NULL,
    created_at TEXT NOT NULL
  )""",
  "CREATE INDEX IF NOT EXISTS events_response_id ON events (response_id)",
)


def _utc_now() -> str:
  now = datetime.datetime.now(datetime.UTC)
  return now.isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclasses.dataclass(frozen=True)
class _Dialect:
  """What differs between the DB-API drivers; the SQL is otherwise shared."""

  name: str
  serial: str  # column type of the auto-increasing `seq` primary key
  real: str  # column type of a float
  placeholder: str  # parameter marker of the driver's paramstyle
  write_lock: str  # statement that starts a serialised write transaction

  def sql(self, statement: str) -> str:
    return statement.replace("?", self.placeholder)


_SQLITE = _Dialect(
  name="sqlite",
  serial="INTEGER PRIMARY KEY AUTOINCREMENT",  # AUTOINCREMENT: a seq is never reused
  real="REAL",
  placeholder="?",
  write_lock="BEGIN IMMEDIATE",  # takes the single writer lock up front
)
_POSTGRES = _Dialect(
  name="postgresql",
  serial="BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY",
  real="DOUBLE PRECISION",
  placeholder="%s",
  write_lock=f"SELECT pg_advisory_xact_lock({_PG_WRITE_LOCK})",
)


def _connect_sqlite(path: str, synchronous: str) -> Any:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  # isolation_level=None: no implicit transactions; writes open theirs with BEGIN IMMEDIATE.
  conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30.0)
  mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
  if mode.lower() != "wal":
    raise RuntimeError(f"{path}: could not switch SQLite to WAL mode (got {mode!r})")
  conn.execute(f"PRAGMA synchronous={synchronous}")
  conn.execute("PRAGMA foreign_keys=ON")
  conn.execute("PRAGMA busy_timeout=30000")
  return conn


def _connect_postgres(url: str) -> Any:
  try:
    import psycopg  # noqa: PLC0415 - optional dependency, only for postgresql:// URLs
  except ImportError as e:
    raise ImportError(
      f"store_url {url.split('@')[-1]!r} needs the PostgreSQL driver: pip install 'psycopg[binary]'"
    ) from e
  # Explicit transactions (psycopg's default): `_write` and `_read` end each with commit/rollback.
  return psycopg.connect(url, autocommit=False)


class FeedbackStore:
  """Served responses and behavior events behind one DB-API connection (thread-safe).

  Open with `open_store`. Producers call `add_responses` / `add_event`; the trainer calls
  `read_new(cursor)` and keeps the returned cursor in its checkpoint.
  """

  def __init__(
    self, conn: Any, dialect: _Dialect, where: str, connect: Callable[[], Any] | None = None
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
    def create():
      for statement in _DDL:
        self._execute(statement.format(serial=self._dialect.serial, real=self._dialect.real))
      self._execute(
        "INSERT INTO store_meta (key, value) VALUES ('schema_version', ?) "
        "ON CONFLICT (key) DO NOTHING",
        (str(SCHEMA_VERSION),),
      )
      return self._execute("SELECT value FROM store_meta WHERE key = 'schema_version'").fetchone()

    (version,) = self._write(create)
    if int(version) != SCHEMA_VERSION:
      raise RuntimeError(
        f"{self.where}: feedback store schema version {version}, this code reads {SCHEMA_VERSION}"
      )

  # -- producers ----------------------------------------------------------------------------------

  def add_responses(
    self,
    queries: Sequence[str],
    behaviors: Sequence[str | None],
    responses: Sequence[str],
    model_step: int,
  ) -> list[str]:
    """Records a batch of served responses in one transaction; returns their new ids."""
    if not len(queries) == len(behaviors) == len(responses):
      raise ValueError("add_responses: queries, behaviors and responses differ in length")
    ids = [uuid.uuid4().hex for _ in queries]
    now = _utc_now()

    def insert():
      for rid, query, behavior, response in zip(ids, queries, behaviors, responses, strict=True):
        self._execute(
          "INSERT INTO responses (id, query, behavior, response, model_step, created_at) "
          "VALUES (?, ?, ?, ?, ?, ?)",
          (rid, query, behavior, response, int(model_step), now),
        )

    self._write(insert)
    return ids

  def add_event(self, response_id: str, event_id: str, type: str, value: float = 1.0) -> bool:
    """Records one behavior event; True if it is new, False if `event_id` was already stored.

    The first event with a given `event_id` wins; a repeat changes nothing, whatever it carries.

    Raises:
      UnknownResponseError: `response_id` was never served.
    """

    def insert():
      # One statement on the common path (a new event for a known response): a round trip less
      # on PostgreSQL. Nothing inserted means a duplicate, or an unknown response (checked then).
      cur = self._execute(
        "INSERT INTO events (event_id, response_id, type, value, created_at) "
        "SELECT ?, ?, ?, ?, ? WHERE EXISTS (SELECT 1 FROM responses WHERE id = ?) "
        "ON CONFLICT (event_id) DO NOTHING",
        (event_id, response_id, type, float(value), _utc_now(), response_id),
      )
      if cur.rowcount == 1:
        return True
      known = self._execute("SELECT 1 FROM responses WHERE id = ?", (response_id,)).fetchone()
      if known is None:
        raise UnknownResponseError(response_id)
      return False

    return self._write(insert)

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
        "SELECT seq, id, query, behavior, response, model_step, created_at FROM responses "
        "WHERE seq > ? ORDER BY seq" + tail,
        (cursor["responses"],),
      )
    ]
    events = [
      EventRow(*row)
      for row in self._read(
        "SELECT e.seq, e.event_id, e.response_id, e.type, e.value, e.created_at, "
        "r.query, r.response, r.behavior, r.model_step "
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
    connect = functools.partial(_connect_postgres, url)
    return FeedbackStore(connect(), _POSTGRES, url.split("@")[-1], connect)
  if url.startswith("sqlite:///"):
    path = url[len("sqlite:///") :]  # sqlite:///rel.db is relative, sqlite:////abs.db absolute
  elif "://" in url:
    raise ValueError(f"store_url {url!r}: expected a path, sqlite:///path or postgresql://...")
  else:
    path = url or os.path.join(os.fspath(workdir), "feedback.db")
  return FeedbackStore(_connect_sqlite(path, synchronous), _SQLITE, path)
