"""The feedback store's SQL: its schema, its upgrade from older versions, and the two databases.

The SQL is shared between SQLite and PostgreSQL except the column types, the parameter marker and
the statement that serialises writers (`Dialect`). The schema is in docs/SERVING.md ("The feedback
store"); `SCHEMA_VERSION` is stored in `store_meta`, and a store written by an older version is
upgraded in place when opened (`upgrade`).
"""

from __future__ import annotations

import dataclasses
import os
import sqlite3
from collections.abc import Callable
from typing import Any

SCHEMA_VERSION = 2
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

# Version 2. `identity` is "" where nobody was identified (serve.auth=none, or a version 1 store).
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
  """CREATE TABLE IF NOT EXISTS events (
    seq {serial},
    event_id TEXT NOT NULL UNIQUE,
    response_id TEXT NOT NULL REFERENCES responses (id),
    type TEXT NOT NULL,
    value {real} NOT NULL,
    created_at TEXT NOT NULL,
    identity TEXT NOT NULL DEFAULT '',
    counted SMALLINT NOT NULL DEFAULT 1,
    replaces BIGINT
  )""",
  "CREATE INDEX IF NOT EXISTS events_response_id ON events (response_id)",
  "CREATE INDEX IF NOT EXISTS events_vote ON events (response_id, identity, type)",
  """CREATE TABLE IF NOT EXISTS shown (
    response_id TEXT NOT NULL REFERENCES responses (id),
    identity TEXT NOT NULL,
    created_at TEXT NOT NULL,
    PRIMARY KEY (response_id, identity)
  )""",
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


def create_or_upgrade(execute: Callable[..., Any], dialect: Dialect, where: str) -> None:
  """Creates the schema, or upgrades an older one, inside the caller's write transaction."""
  execute(META)
  row = execute("SELECT value FROM store_meta WHERE key = 'schema_version'").fetchone()
  version = None if row is None else int(row[0])
  if version not in (None, 1, SCHEMA_VERSION):
    raise RuntimeError(
      f"{where}: feedback store schema version {version}, this code reads {SCHEMA_VERSION}"
    )
  if version == 1:
    for statement in _FROM_1:
      execute(statement)
  for statement in TABLES:
    execute(statement.format(serial=dialect.serial, real=dialect.real))
  execute(
    "INSERT INTO store_meta (key, value) VALUES ('schema_version', ?) "
    "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
    (str(SCHEMA_VERSION),),
  )


def connect_sqlite(path: str, synchronous: str) -> Any:
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


def connect_postgres(url: str) -> Any:
  try:
    import psycopg  # noqa: PLC0415 - optional dependency, only for postgresql:// URLs
  except ImportError as e:
    raise ImportError(
      f"store_url {url.split('@')[-1]!r} needs the PostgreSQL driver: pip install 'psycopg[binary]'"
    ) from e
  # Explicit transactions (psycopg's default): the store ends each with commit or rollback.
  return psycopg.connect(url, autocommit=False)
