"""The feedback store's SQL: its schema, its upgrade from older versions, and the two databases.

The SQL is shared between SQLite and PostgreSQL except the column types, the parameter marker and
the statement that serialises writers (`Dialect`). The schema is in docs/SERVING.md ("The feedback
store"); `SCHEMA_VERSION` is stored in `store_meta`, and a store written by an older version is
upgraded in place when opened (`upgrade`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sqlite3
from collections.abc import Callable
from typing import Any

SCHEMA_VERSION = 3
# Arbitrary constant naming the PostgreSQL advisory lock that serialises writers.
_PG_WRITE_LOCK = 0x726C6862


@dataclasses.dataclass(frozen=True)
class Dialect:
  """What differs between the DB-API drivers; the SQL is otherwise shared."""

  name: str
  serial: str  # column type of the auto-increasing `seq` primary key
  real: str  # column type of a float
  placeholder: str  # parameter marker of the driver's paramstyle
  write_lock: str  # statement that starts a serialised write transaction

  def sql(self, statement: str) -> str:
    return statement.replace("?", self.placeholder)


SQLITE = Dialect(
  name="sqlite",
  serial="INTEGER PRIMARY KEY AUTOINCREMENT",  # AUTOINCREMENT: a seq is never reused
  real="REAL",
  placeholder="?",
  write_lock="BEGIN IMMEDIATE",  # takes the single writer lock up front
)
POSTGRES = Dialect(
  name="postgresql",
  serial="BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY",
  real="DOUBLE PRECISION",
  placeholder="%s",
  write_lock=f"SELECT pg_advisory_xact_lock({_PG_WRITE_LOCK})",
)

META = """CREATE TABLE IF NOT EXISTS store_meta (
  key TEXT PRIMARY KEY,
  value TEXT NOT NULL
)"""

# Version 3. `identity` is "" where nobody was identified (serve.auth=none, or a version 1 store);
# event ids are the client's, unique per identity; `address` is the keyed hash of the sender's
# address ("" before version 3); `young` marks a vote from a session too young to count.
EVENTS = """CREATE TABLE IF NOT EXISTS events (
    seq {serial},
    event_id TEXT NOT NULL,
    response_id TEXT NOT NULL REFERENCES responses (id),
    type TEXT NOT NULL,
    value {real} NOT NULL,
    created_at TEXT NOT NULL,
    identity TEXT NOT NULL DEFAULT '',
    counted SMALLINT NOT NULL DEFAULT 1,
    replaces BIGINT,
    address TEXT NOT NULL DEFAULT '',
    young SMALLINT NOT NULL DEFAULT 0,
    UNIQUE (identity, event_id)
  )"""
TABLES = (
  """CREATE TABLE IF NOT EXISTS responses (
    seq {serial},
    id TEXT NOT NULL UNIQUE,
    query TEXT NOT NULL,
    behavior TEXT,
    response TEXT NOT NULL,
    model_step BIGINT NOT NULL,
    created_at TEXT NOT NULL,
    identity TEXT NOT NULL DEFAULT ''
  )""",
  EVENTS,
  "CREATE INDEX IF NOT EXISTS events_response_id ON events (response_id)",
  "CREATE INDEX IF NOT EXISTS events_vote ON events (response_id, identity, type)",
  """CREATE TABLE IF NOT EXISTS shown (
    response_id TEXT NOT NULL REFERENCES responses (id),
    identity TEXT NOT NULL,
    created_at TEXT NOT NULL,
    PRIMARY KEY (response_id, identity)
  )""",
  "CREATE INDEX IF NOT EXISTS shown_identity ON shown (identity)",
  # One row per session minted, by the keyed hash of the client's network (the young rule's and
  # the per-address cap's memory, shared by replicas).
  """CREATE TABLE IF NOT EXISTS session_mints (
    network TEXT NOT NULL,
    created_at TEXT NOT NULL
  )""",
  "CREATE INDEX IF NOT EXISTS session_mints_network ON session_mints (network, created_at)",
  """CREATE TABLE IF NOT EXISTS api_keys (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    key_hash TEXT NOT NULL UNIQUE,
    created_at TEXT NOT NULL,
    revoked_at TEXT
  )""",
)

# What turns a version 1 store into version 2 (its rows become unattributed, counted events).
_FROM_1 = (
  "ALTER TABLE responses ADD COLUMN identity TEXT NOT NULL DEFAULT ''",
  "ALTER TABLE events ADD COLUMN identity TEXT NOT NULL DEFAULT ''",
  "ALTER TABLE events ADD COLUMN counted SMALLINT NOT NULL DEFAULT 1",
  "ALTER TABLE events ADD COLUMN replaces BIGINT",
)


_EVENT_COLUMNS_2 = (
  "seq, event_id, response_id, type, value, created_at, identity, counted, replaces"
)


def _from_2(execute: Callable[..., Any], dialect: Dialect) -> None:
  """Version 2 -> 3: event ids unique per identity (no longer globally), `address`, `young`."""
  if dialect.name == "postgresql":
    execute("ALTER TABLE events DROP CONSTRAINT IF EXISTS events_event_id_key")
    execute("ALTER TABLE events ADD COLUMN address TEXT NOT NULL DEFAULT ''")
    execute("ALTER TABLE events ADD COLUMN young SMALLINT NOT NULL DEFAULT 0")
    execute(
      "ALTER TABLE events ADD CONSTRAINT events_identity_event_id_key UNIQUE (identity, event_id)"
    )
    return
  # SQLite cannot drop a constraint: the table is rebuilt (seq values kept; AUTOINCREMENT's
  # counter follows the largest inserted).
  execute("ALTER TABLE events RENAME TO events_v2")
  for index in ("events_response_id", "events_vote"):
    execute(f"DROP INDEX IF EXISTS {index}")
  execute(EVENTS.format(serial=dialect.serial, real=dialect.real))
  execute(
    f"INSERT INTO events ({_EVENT_COLUMNS_2}) SELECT {_EVENT_COLUMNS_2} FROM events_v2 ORDER BY seq"
  )
  execute("DROP TABLE events_v2")


def create_or_upgrade(execute: Callable[..., Any], dialect: Dialect, where: str) -> None:
  """Creates the schema, or upgrades an older one, inside the caller's write transaction."""
  execute(META)
  row = execute("SELECT value FROM store_meta WHERE key = 'schema_version'").fetchone()
  version = None if row is None else int(row[0])
  if version not in (None, 1, 2, SCHEMA_VERSION):
    raise RuntimeError(
      f"{where}: feedback store schema version {version}, this code reads {SCHEMA_VERSION}"
    )
  if version == 1:
    for statement in _FROM_1:
      execute(statement)
  if version in (1, 2):
    _from_2(execute, dialect)
  for statement in TABLES:
    execute(statement.format(serial=dialect.serial, real=dialect.real))
  execute(
    "INSERT INTO store_meta (key, value) VALUES ('schema_version', ?) "
    "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
    (str(SCHEMA_VERSION),),
  )


def connect_sqlite(path: str, synchronous: str) -> Any:
  """A connection to the SQLite file `path`, made readable by its owner only (0600: it holds the
  session secret and the address key); SQLite gives its -wal and -shm files the same mode."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
  for name in (path, path + "-wal", path + "-shm"):  # a store made 0644 by an older version
    if os.path.exists(name):
      with contextlib.suppress(OSError):  # not ours to change: left as it is
        os.chmod(name, 0o600)
  # isolation_level=None: no implicit transactions; writes open theirs with BEGIN IMMEDIATE.
  conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30.0)
  mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
  if mode.lower() != "wal":
    raise RuntimeError(f"{path}: could not switch SQLite to WAL mode (got {mode!r})")
  conn.execute(f"PRAGMA synchronous={synchronous}")
  conn.execute("PRAGMA foreign_keys=ON")
  conn.execute("PRAGMA busy_timeout=30000")
  return conn


def connect_postgres(url: str) -> Any:
  try:
    import psycopg  # noqa: PLC0415 - optional dependency, only for postgresql:// URLs
  except ImportError as e:
    raise ImportError(
      f"store_url {url.split('@')[-1]!r} needs the PostgreSQL driver: pip install 'psycopg[binary]'"
    ) from e
  # Explicit transactions (psycopg's default): the store ends each with commit or rollback.
  return psycopg.connect(url, autocommit=False)
