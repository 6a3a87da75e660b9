"""The feedback store: durability settings, idempotence, exactly-once consumption, aggregation.

Tests taking `store` or `store_url` run twice: on SQLite and on a throwaway PostgreSQL cluster
(tests/pg.py, started by the `pg_cluster` fixture in conftest.py).
"""

import json
import sqlite3
import sys
import threading

import pytest

from rlhb_jax.serving import (
  ServeConfig,
  UnknownResponseError,
  aggregate_records,
  open_store,
  start_cursor,
)


@pytest.fixture
def store(store_url):
  with open_store(store_url) as s:
    yield s


def test_default_file_is_wal_with_full_sync(tmp_path):
  store = open_store("", tmp_path)
  assert store.where == str(tmp_path / "feedback.db")
  raw = sqlite3.connect(tmp_path / "feedback.db")
  assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
  tables = {r[0] for r in raw.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
  assert {"responses", "events", "store_meta"} <= tables
  # synchronous is per connection: check the store's own (2 = FULL).
  assert store._conn.execute("PRAGMA synchronous").fetchone()[0] == 2
  store.close()


def test_events_are_idempotent_and_checked_against_responses(store):
  rid, other = store.add_responses(
    ["q1", "q2"], [None, "many liked it"], ["a1", "a2"], model_step=3
  )
  assert store.add_event(rid, "e1", "likes") is True
  assert store.add_event(rid, "e1", "likes") is False
  # A repeat with different content changes nothing: the first event wins.
  assert store.add_event(other, "e1", "dislikes", 5) is False
  with pytest.raises(UnknownResponseError):
    store.add_event("no-such-id", "e2", "likes")
  assert store.counts() == {"responses": 2, "events": 1}
  feed, _ = store.read_new()
  (event,) = feed.events
  assert (event.response_id, event.type, event.value, event.query) == (rid, "likes", 1.0, "q1")
  assert [r.behavior for r in feed.responses] == [None, "many liked it"]
  assert [r.model_step for r in feed.responses] == [3, 3]


def test_read_new_returns_each_row_once_across_reopen(store_url):
  with open_store(store_url) as s:
    ids = s.add_responses([f"q{i}" for i in range(5)], [None] * 5, ["a"] * 5, 0)
    for i, rid in enumerate(ids):
      s.add_event(rid, f"e{i}", "clicks")
    feed, cursor = s.read_new(start_cursor(), limit=3)
    assert [e.event_id for e in feed.events] == ["e0", "e1", "e2"]
    assert len(feed.responses) == 3
    saved = json.dumps(cursor)  # what the trainer puts in its checkpoint
  # Restart: a new connection, more events arrive, the saved cursor resumes exactly.
  with open_store(store_url) as s:
    s.add_event(ids[0], "e5", "likes")
    feed, cursor = s.read_new(json.loads(saved))
    assert [e.event_id for e in feed.events] == ["e3", "e4", "e5"]
    assert [r.query for r in feed.responses] == ["q3", "q4"]
    feed, again = s.read_new(cursor)
    assert feed.events == [] and feed.responses == [] and again == cursor


@pytest.mark.parametrize("cursor", [{"events": 0}, {"responses": -1, "events": 0}, {"a": 1}])
def test_bad_cursor_is_an_error(store, cursor):
  with pytest.raises(ValueError, match="cursor"):
    store.read_new(cursor)


def test_concurrent_writers_and_reader_see_every_event_once(store_url):
  """Writers on two connections (as two processes would be), a reader polling by cursor."""
  stores = [open_store(store_url) for _ in range(3)]
  (rid,) = stores[0].add_responses(["q"], [None], ["a"], 0)
  per_thread = 60
  done = threading.Event()

  def write(k):
    for i in range(per_thread):
      stores[k % 2].add_event(rid, f"t{k}-{i}", "impressions")

  seen, cursor = [], start_cursor()

  def read():
    nonlocal cursor
    while True:
      finished = done.is_set()  # read once more after the writers stopped
      feed, cursor = stores[2].read_new(cursor, limit=7)
      seen.extend(e.event_id for e in feed.events)
      if finished and not feed.events:
        return

  writers = [threading.Thread(target=write, args=(k,)) for k in range(4)]
  reader = threading.Thread(target=read)
  reader.start()
  for t in writers:
    t.start()
  for t in writers:
    t.join()
  done.set()
  reader.join()
  assert len(seen) == len(set(seen)) == 4 * per_thread
  for s in stores:
    s.close()


def test_aggregate_records_sums_events_per_response(store):
  r1, r2 = store.add_responses(["q1", "q2"], ["cond", None], ["a1", "a2"], model_step=7)
  for i, (rid, kind, value) in enumerate(
    [
      (r1, "impressions", 1),
      (r1, "impressions", 1),
      (r1, "likes", 1),
      (r1, "dwell_seconds", 2.5),
      (r2, "impressions", 1),
      (r2, "custom_signal", 4),
      (r1, "dwell_seconds", 1.0),
    ]
  ):
    store.add_event(rid, f"e{i}", kind, value)
  feed, _ = store.read_new()
  records = aggregate_records(feed.events, behavior_types=("impressions", "likes", "dislikes"))
  assert [r["id"] for r in records] == [r1, r2]
  first, second = records
  assert first["behavior"] == {"impressions": 2, "likes": 1, "dislikes": 0, "dwell_seconds": 3.5}
  assert isinstance(first["behavior"]["impressions"], int)
  assert second["behavior"] == {"impressions": 1, "likes": 0, "dislikes": 0, "custom_signal": 4}
  assert (first["query"], first["response"]) == ("q1", "a1")
  assert first["meta"] == {
    "source": "serve",
    "behavior_condition": "cond",
    "model_step": 7,
    "events": 5,
    "identities": 0,  # nobody identified: the events were stored without an identity
  }
  assert first["timestamp"] == max(e.created_at for e in feed.events if e.response_id == r1)
  assert first["timestamp"].endswith("Z")
  json.dumps(records)  # JSONL-ready


def test_store_urls(tmp_path):
  with open_store(f"sqlite:///{tmp_path}/x/y.db", "ignored") as s:
    assert s.where == f"{tmp_path}/x/y.db"
  with open_store(str(tmp_path / "plain.db")) as s:
    assert s.counts() == {"responses": 0, "events": 0}
  with pytest.raises(ValueError, match="store_url"):
    open_store("mysql://host/db")


def test_postgres_url_without_driver_names_the_package_and_hides_the_password(monkeypatch):
  monkeypatch.setitem(sys.modules, "psycopg", None)  # as if psycopg were not installed
  with pytest.raises(ImportError, match="psycopg") as info:
    open_store("postgresql://user:secret@localhost/feedback")
  assert "secret" not in str(info.value)


def test_postgres_store_names_no_credentials(pg_cluster):
  url = pg_cluster.new_database()
  with open_store(url) as s:
    assert s.where == url.split("@")[1] and "postgres@" not in s.where
    assert s.counts() == {"responses": 0, "events": 0}


def test_postgres_store_reconnects_after_the_server_drops_it(pg_cluster):
  import psycopg  # noqa: PLC0415 - present: pg_cluster skips without it

  url = pg_cluster.new_database()
  with open_store(url) as s:
    (rid,) = s.add_responses(["q"], [None], ["a"], 0)
    assert s.add_event(rid, "e1", "likes") is True
    with psycopg.connect(url, autocommit=True) as admin:  # as a database restart would
      admin.execute(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
        "WHERE datname = current_database() AND pid <> pg_backend_pid()"
      )
    with pytest.raises(psycopg.OperationalError):
      s.add_event(rid, "e2", "likes")  # the call that finds the connection gone fails
    assert s.add_event(rid, "e2", "likes") is True  # its retry lands on a new connection
    assert s.add_event(rid, "e1", "likes") is False
    assert s.counts() == {"responses": 1, "events": 2}


def test_schema_version_mismatch_is_refused(store_url):
  with open_store(store_url) as s:
    s._write(lambda: s._execute("UPDATE store_meta SET value = '99' WHERE key = 'schema_version'"))
  with pytest.raises(RuntimeError, match="schema version 99"):
    open_store(store_url)


def test_serve_config_validates():
  assert ServeConfig().host == "127.0.0.1"
  with pytest.raises(ValueError, match="batch_max_size"):
    ServeConfig(batch_max_size=0)
  with pytest.raises(ValueError, match="sqlite_synchronous"):
    ServeConfig(sqlite_synchronous="OFF")
