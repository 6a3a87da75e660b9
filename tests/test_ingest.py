"""Identified events in the store and on their way to training: votes, the schema upgrade, the
aggregation cap, anomalous identities and their quarantine (issue #24). No HTTP, no JAX."""

import json
import sqlite3

import pytest

from rlhb_jax import config as config_lib
from rlhb_jax.jobs import inspect_logs
from rlhb_jax.serving import (
  EventRow,
  IngestConfig,
  NotShownError,
  UnknownResponseError,
  aggregate_records,
  one_vote,
  open_store,
)
from rlhb_jax.serving.ingest import identity_stats, screen

REACT = ("likes", "dislikes")


@pytest.fixture
def store(store_url):
  with open_store(store_url) as s:
    yield s


def test_identified_events_are_one_vote_on_shown_responses(store):
  (rid,) = store.add_responses(["q"], [None], ["a"], 0, identities=["key:a"])
  with pytest.raises(NotShownError):
    store.add_event(rid, "b1", "likes", identity="key:b", reaction_types=REACT)
  with pytest.raises(UnknownResponseError):
    store.add_event("nope", "b1", "likes", identity="key:b")
  assert store.show(rid, "key:b").query == "q"
  assert store.show(rid, "key:b").identity == "key:a"  # twice: recorded once, who asked kept
  votes = [
    ("key:a", "a1", "likes", True),
    ("key:a", "a2", "likes", False),  # repeat: stored, not counted
    ("key:a", "a1", "dislikes", False),  # a seen event id: nothing stored
    ("key:a", "a3", "dislikes", True),  # replaces the like
    ("key:a", "a4", "likes", True),  # and back
    ("key:b", "b1", "clicks", True),
    ("key:b", "b2", "clicks", False),
  ]
  for identity, event_id, kind, counts in votes:
    assert store.add_event(rid, event_id, kind, 1.0, identity, REACT) is counts, event_id
  feed, _ = store.read_new()
  got = [(e.event_id, e.identity, e.counted, e.replaces) for e in feed.events]
  seq = {e.event_id: e.seq for e in feed.events}
  assert got == [
    ("a1", "key:a", True, None),
    ("a2", "key:a", False, None),
    ("a3", "key:a", True, seq["a1"]),
    ("a4", "key:a", True, seq["a3"]),
    ("b1", "key:b", True, None),
    ("b2", "key:b", False, None),
  ]
  (record,) = aggregate_records(feed.events, ("likes", "dislikes", "clicks"))
  assert record["behavior"] == {"likes": 1, "dislikes": 0, "clicks": 1}
  # Unidentified events (serve.auth=none) are counted as before: every new event id.
  assert store.add_event(rid, "anon1", "likes") is True
  assert store.add_event(rid, "anon2", "likes") is True


def test_a_version_1_store_is_upgraded_in_place(store_url):
  """A store written before identities existed opens, keeps its rows, and takes identities."""
  if store_url.startswith("postgresql"):
    import psycopg

    conn, mark = psycopg.connect(store_url, autocommit=True), "%s"
    serial, real = "BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY", "DOUBLE PRECISION"
  else:
    conn, mark = sqlite3.connect(store_url, isolation_level=None), "?"
    serial, real = "INTEGER PRIMARY KEY AUTOINCREMENT", "REAL"
  for statement in (
    "CREATE TABLE store_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    f"CREATE TABLE responses (seq {serial}, id TEXT NOT NULL UNIQUE, query TEXT NOT NULL, "
    "behavior TEXT, response TEXT NOT NULL, model_step BIGINT NOT NULL, created_at TEXT NOT NULL)",
    f"CREATE TABLE events (seq {serial}, event_id TEXT NOT NULL UNIQUE, response_id TEXT "
    f"NOT NULL REFERENCES responses (id), type TEXT NOT NULL, value {real} NOT NULL, "
    "created_at TEXT NOT NULL)",
    "INSERT INTO store_meta VALUES ('schema_version', '1')",
    "INSERT INTO responses (id, query, behavior, response, model_step, created_at) "
    "VALUES ('r1', 'q', NULL, 'a', 3, '2026-11-01T00:00:00.000Z')",
  ):
    conn.execute(statement)
  conn.execute(
    f"INSERT INTO events (event_id, response_id, type, value, created_at) VALUES "
    f"({mark}, 'r1', 'likes', 1, '2026-11-01T00:00:01.000Z')",
    ("old",),
  )
  conn.close()
  with open_store(store_url) as s:
    feed, _ = s.read_new()
    assert [(e.event_id, e.identity, e.counted) for e in feed.events] == [("old", "", True)]
    assert feed.responses[0].identity == ""
    assert s.show("r1", "key:x").id == "r1"
    assert s.add_event("r1", "new", "likes", identity="key:x") is True
  with open_store(store_url) as s:  # and opens again as version 2
    assert s.counts() == {"responses": 1, "events": 2}


def ev(seq, identity, rid, kind, counted=True, text=None):
  """An event on response `rid`, whose text is its own unless `text` names a shared one."""
  text = f"a-{rid}" if text is None else text
  return EventRow(seq, f"e{seq}", rid, kind, 1.0, "t", "q", text, None, 0, identity, counted)


def test_one_vote_keeps_the_first_vote_and_the_latest_reaction():
  events = [
    ev(1, "key:a", "r", "likes"),
    ev(2, "key:a", "r", "likes"),
    ev(3, "key:a", "r", "clicks"),
    ev(4, "key:a", "r", "dislikes"),
    ev(5, "key:b", "r", "likes", counted=False),  # the store did not count it
    ev(6, "", "r", "likes"),
    ev(7, "", "r", "likes"),  # unidentified: all count
    ev(8, "key:a", "s", "likes"),  # another response: another vote
    ev(9, "key:a", "s2", "likes", text="a-s"),  # the same answer again (issue #39): no new vote
  ]
  assert [e.seq for e in one_vote(events, REACT)] == [3, 4, 6, 7, 9]
  records = aggregate_records(events, ("likes", "dislikes", "clicks"))
  assert [r["behavior"] for r in records] == [
    {"likes": 2, "dislikes": 1, "clicks": 1},
    {"likes": 1, "dislikes": 0, "clicks": 0},
  ]
  uncapped = aggregate_records(events, ("likes", "dislikes", "clicks"), cap=False)
  assert uncapped[0]["behavior"] == {"likes": 4, "dislikes": 1, "clicks": 1}


def crowd(n_users=20, n_responses=10):
  """Honest users: each response shown to every user; each dislikes 1 in 5, the others like."""
  events, seq = [], 0
  for r in range(n_responses):
    for u in range(n_users):
      seq += 1
      events.append(ev(seq, f"key:u{u}", f"r{r}", "impressions"))
      seq += 1
      events.append(ev(seq, f"key:u{u}", f"r{r}", "likes" if (u + r) % 5 else "dislikes"))
  return events, seq


def test_screen_flags_volume_and_disagreement_and_quarantines_their_events():
  events, seq = crowd()
  # A script: 500 likes on its own answer. A contrarian: dislikes what everyone else likes.
  for i in range(500):
    seq += 1
    events.append(ev(seq, "key:script", "mine", "likes", counted=i == 0))
  for r in range(10):
    seq += 1
    events.append(ev(seq, "key:contrarian", f"r{r}", "dislikes"))
  stats = identity_stats(events, REACT)
  assert stats["key:u1"].events == 20 and stats["key:u1"].agreement == 0.8
  assert (stats["key:contrarian"].compared, stats["key:contrarian"].agreed) == (10, 0)
  cfg = IngestConfig(min_volume=100, volume_factor=10, min_agreement=0.2, min_compared=10)
  screened = screen(events, cfg, REACT)
  assert set(screened.flagged) == {"key:script", "key:contrarian"}
  assert screened.flagged["key:script"].startswith("volume: 500 events")
  assert screened.flagged["key:contrarian"].startswith("agreement: ")
  assert len(screened.quarantined) == 500 + 10
  assert all(e.identity not in screened.flagged for e in screened.kept)
  assert len(screened.kept) + len(screened.quarantined) == len(events)
  # Only reported, not set aside, without quarantine; nothing flagged with looser thresholds.
  reported = screen(events, IngestConfig(quarantine=False), REACT)
  assert reported.flagged and reported.quarantined == [] and len(reported.kept) == len(events)
  loose = IngestConfig(min_volume=1000, min_agreement=0.0)
  assert screen(events, loose, REACT).flagged == {}


def test_inspect_logs_reports_and_quarantines_anomalous_identities(tmp_path, capsys):
  with open_store("", tmp_path) as s:
    ids = s.add_responses([f"q{r}" for r in range(4)], [None] * 4, ["a"] * 4, 0)
    for u in range(6):
      for rid in ids:
        s.show(rid, f"key:u{u}")
        s.add_event(rid, f"{rid}-{u}", "likes", identity=f"key:u{u}", reaction_types=REACT)
    (mine,) = s.add_responses(["q"], [None], ["wrong"], 0, identities=["key:bot"])
    for i in range(150):
      s.add_event(mine, f"bot-{i}", "likes", identity="key:bot", reaction_types=REACT)
  cfg = config_lib.replace(config_lib.Config(), mode="inspect_logs")
  out = inspect_logs.run(cfg, tmp_path)["identities"]
  assert out["events_read"] == 6 * 4 + 150 and out["identities"] == 7
  assert list(out["flagged"]) == ["key:bot"] and out["quarantined_events"] == 150
  assert out["not_counted_events"] == 0  # the bot's 149 repeats were quarantined with it
  lines = (tmp_path / "quarantine_identities.jsonl").read_text().splitlines()
  assert len(lines) == 150 and json.loads(lines[0])["reason"].startswith("volume")
  assert json.loads((tmp_path / "inspect_identities.json").read_text()) == out
  assert "key:bot: volume" in capsys.readouterr().out
  with pytest.raises(ValueError, match="feedback store"):
    inspect_logs.run(cfg, tmp_path / "empty")
