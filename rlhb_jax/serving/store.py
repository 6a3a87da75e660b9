"""Append-only, crash-safe store of served responses and the behavior events users send back.

Two tables (schema in docs/SERVING.md): `responses`, one row per answer the server gave, and
`events`, one row per behavior event, unique on its sender's `(identity, event_id)` so a retried
POST is stored once (and nobody can spend another sender's event ids). Every
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
response it was shown, and counts only as that identity's one vote of its type on the response
(across the consumer's reads as well: `read_new`), and only once the identity is no longer young.
API keys, secrets and session mints are in `identities.py`; the SQL and the schema in `sql.py`.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import threading
import uuid
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from rlhb_jax.serving import sql
from rlhb_jax.serving.identities import IdentityTables, utc_now
from rlhb_jax.serving.records import (
  REACTIONS,
  EventRow,
  Feed,
  NotShownError,
  ResponseRow,
  UnknownResponseError,
  check_cursor,
)

T = TypeVar("T")
log = logging.getLogger(__name__)


class FeedbackStore(IdentityTables):
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
    the response (an impression the server minted), so its feedback on it is accepted.
    """
    identities = [""] * len(queries) if identities is None else list(identities)
    if not len(queries) == len(behaviors) == len(responses) == len(identities):
      raise ValueError("add_responses: queries, behaviors, responses, identities differ in length")
    ids = [uuid.uuid4().hex for _ in queries]
    now = utc_now()
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
          (response_id, identity, utc_now()),
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
    address: str = "",
    young: bool = False,
    young_impressions: int = 0,
  ) -> bool:
    """Records one behavior event; True if it counts, False if not.

    Event ids are the sender's: the first event with a given `(identity, event_id)` wins, and a
    repeat changes nothing, whatever it carries. From an identified sender (`identity` not ""), an
    event counts as its one vote of `type` on the response: a second one of that type is stored
    with `counted` false (a repeated vote, kept so that its volume shows); of `reaction_types`
    (likes, dislikes) the identity holds one vote, and a different reaction replaces the one it
    holds (`replaces`, its seq). A vote from a young session (`young`: too recent, or shown fewer
    than `young_impressions` answers) is stored with `young` and `counted` false. Unidentified
    events (`identity` "", serve.auth=none) all count. `address` is the sender's address as a
    keyed hash (auth.py).

    Raises:
      UnknownResponseError: `response_id` was never served.
      NotShownError: `identity` was never shown `response_id`.
    """
    if not identity:
      return self._write(
        lambda: self._insert_unidentified(response_id, event_id, type, value, address)
      )
    group = tuple(reaction_types) if type in reaction_types else (type,)

    def insert():
      if self._one("SELECT 1 FROM responses WHERE id = ?", (response_id,)) is None:
        raise UnknownResponseError(response_id)
      shown = "SELECT 1 FROM shown WHERE response_id = ? AND identity = ?"
      if self._one(shown, (response_id, identity)) is None:
        raise NotShownError(f"{identity} was not shown response {response_id}")
      seen = "SELECT 1 FROM events WHERE identity = ? AND event_id = ?"
      if self._one(seen, (identity, event_id)) is not None:
        return False
      is_young = young
      if not is_young and young_impressions > 0:
        (n,) = self._one("SELECT COUNT(*) FROM shown WHERE identity = ?", (identity,))
        is_young = n < young_impressions
      held = self._one(
        "SELECT seq, type FROM events WHERE response_id = ? AND identity = ? AND counted = 1 "
        f"AND type IN ({', '.join('?' * len(group))}) ORDER BY seq DESC LIMIT 1",
        (response_id, identity, *group),
      )
      vote = held is None or held[1] != type  # not a repeat of the vote it holds
      counted = vote and not is_young
      self._execute(
        "INSERT INTO events (event_id, response_id, type, value, created_at, identity, counted, "
        "replaces, address, young) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (
          event_id,
          response_id,
          type,
          float(value),
          utc_now(),
          identity,
          int(counted),
          held[0] if counted and held is not None else None,
          address,
          int(is_young),
        ),
      )
      # A young vote is no repeat: it is stored, and `young` says why it does not count.
      return vote

    return self._write(insert)

  def _insert_unidentified(
    self, response_id: str, event_id: str, type: str, value: float, address: str
  ) -> bool:
    # One statement on the common path (a new event for a known response): a round trip less on
    # PostgreSQL. Nothing inserted means a duplicate, or an unknown response (checked then).
    cur = self._execute(
      "INSERT INTO events (event_id, response_id, type, value, created_at, address) "
      "SELECT ?, ?, ?, ?, ?, ? WHERE EXISTS (SELECT 1 FROM responses WHERE id = ?) "
      "ON CONFLICT (identity, event_id) DO NOTHING",
      (event_id, response_id, type, float(value), utc_now(), address, response_id),
    )
    if cur.rowcount == 1:
      return True
    if self._one("SELECT 1 FROM responses WHERE id = ?", (response_id,)) is None:
      raise UnknownResponseError(response_id)
    return False

  # -- consumers ----------------------------------------------------------------------------------

  def counts(self) -> dict[str, int]:
    """`{"responses": n, "events": m}`: rows stored so far."""
    (row,) = self._read(
      "SELECT (SELECT COUNT(*) FROM responses), (SELECT COUNT(*) FROM events)", ()
    )
    return {"responses": int(row[0]), "events": int(row[1])}

  def read_new(
    self,
    cursor: dict[str, int] | None = None,
    limit: int | None = None,
    reaction_types: Sequence[str] = REACTIONS,
  ) -> tuple[Feed, dict[str, int]]:
    """Rows committed after `cursor`, and the cursor to pass next time.

    Args:
      cursor: `{"responses": seq, "events": seq}` as returned by the previous call (or
        `start_cursor()` / None for everything). Keep it in the checkpoint next to the model that
        consumed the rows: restoring both together gives exactly-once consumption.
      limit: at most this many rows from each table (None = all); the cursor then advances only
        past the rows returned.
      reaction_types: an identity's vote among these (likes, dislikes) on a response is read as
        counted once across reads: a later one whose identity held a counted vote of these on
        the same response before the cursor (one the consumer has read already, in an earlier
        round) comes back with `counted` false. One vote per identity and response, across
        rounds, while a flip inside one read still replaces the earlier vote (`one_vote`).

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
    group = tuple(reaction_types) or ("",)
    marks = ", ".join("?" * len(group))
    voted_before = (  # the identity's vote on this response was read in an earlier round
      f"e.identity <> '' AND e.type IN ({marks}) AND EXISTS (SELECT 1 FROM events p "
      "WHERE p.response_id = e.response_id AND p.identity = e.identity AND p.counted = 1 "
      f"AND p.type IN ({marks}) AND p.seq <= ?)"
    )
    events = [
      EventRow(*row[:11], bool(row[11]), row[12], row[13], bool(row[14]))
      for row in self._read(
        "SELECT e.seq, e.event_id, e.response_id, e.type, e.value, e.created_at, "
        "r.query, r.response, r.behavior, r.model_step, e.identity, "
        f"CASE WHEN e.counted = 1 AND NOT ({voted_before}) THEN 1 ELSE 0 END, "
        "e.replaces, e.address, e.young "
        "FROM events e JOIN responses r ON r.id = e.response_id "
        "WHERE e.seq > ? ORDER BY e.seq" + tail,
        (*group, *group, cursor["events"], cursor["events"]),
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
