"""The holes issue #39 found in the feedback server, one test each (each failed on main at 6c2aec5).

Bad input that broke other requests, impressions a caller could mint for itself, event ids others
could spend, votes counted again every round, free identities, and the store's own weak points.
The HTTP tests run on real 127.0.0.1 sockets against the SQLite and the PostgreSQL store where the
store matters (the `store_url` fixture); no JAX.
"""

import concurrent.futures
import http.client
import json
import os
import stat
import time

import pytest
from test_auth import bearer, generate, serve  # noqa: F401  (serve: the fixture)
from test_server import call

from rlhb_jax.serving import (
  EventRow,
  IngestConfig,
  ServeConfig,
  add_key,
  aggregate_records,
  ingest,
  open_store,
)
from rlhb_jax.serving.auth import Gate
from rlhb_jax.serving.errors import ServiceError


def session(server, address="127.0.0.1"):
  """A fresh page session (its Cookie header), as GET / gives it to a client at `address`."""
  conn = http.client.HTTPConnection(
    "127.0.0.1", server.port, timeout=15, source_address=(address, 0)
  )
  try:
    conn.request("GET", "/")
    response = conn.getresponse()
    response.read()
    assert response.status == 200, response.status
    return {"Cookie": response.getheader("Set-Cookie").split(";")[0]}
  finally:
    conn.close()


def raw(server, method, path, body: bytes, headers=None):
  """A request with a body sent byte for byte; returns (status, decoded JSON answer)."""
  conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=15)
  try:
    conn.request(method, path, body=body, headers=headers or {})
    response = conn.getresponse()
    return response.status, json.loads(response.read())
  finally:
    conn.close()


# -- bad input ------------------------------------------------------------------------------------


def test_text_the_store_cannot_hold_is_422_and_fails_only_its_own_request(serve, store_url):  # noqa: F811
  """A lone surrogate ("\\ud800", which JSON can spell) or a NUL byte: 422 with a message that
  does not quote it; the honest generations batched with it are answered (was: 500 for all)."""
  server = serve(store_url=store_url, batch_timeout_ms=50.0, batch_max_size=16)
  bad = ["a\ud800b", "a\x00b"]  # json.dumps spells them \ud800 and \u0000

  def ask(i):
    if i % 4 == 0:
      body = json.dumps({"query": bad[i // 4 % 2]}).encode()
      return "bad", raw(server, "POST", "/v1/generate", body)
    return "honest", call(server.port, "POST", "/v1/generate", {"query": f"honest {i}"})

  with concurrent.futures.ThreadPoolExecutor(16) as pool:
    answers = list(pool.map(ask, range(64)))
  for kind, (status, out) in answers:
    if kind == "honest":
      assert status == 200, out
    else:
      assert status == 422 and "field 'query'" in out["error"], out
      assert "\ud800" not in out["error"] and "\x00" not in out["error"]
  assert server.store.counts()["responses"] == 48
  rid = generate(server, {})
  for path, body in (
    ("/v1/feedback", {"id": rid, "event_id": "e\x00", "type": "likes"}),
    ("/v1/feedback", {"id": rid, "event_id": "\udfff", "type": "likes"}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "q\x00"}]}),
  ):
    assert raw(server, "POST", path, json.dumps(body).encode())[0] == 422, body
  assert call(server.port, "GET", "/v1/responses/a%00b")[0] == 404
  assert server.store.counts() == {"responses": 49, "events": 0}


def test_an_absurd_dwell_time_is_422(serve):  # noqa: F811
  """1.7e308 twice summed to inf, written as Infinity into round files (was: 200)."""
  server = serve()
  rid = generate(server, {})
  for value, status in ((1.7e308, 422), (86400.5, 422), (86400.0, 200), (12.5, 200)):
    body = {"id": rid, "event_id": f"d{value}", "type": "dwell_seconds", "value": value}
    assert call(server.port, "POST", "/v1/feedback", body)[0] == status, value
  (record,) = aggregate_records(server.store.read_new()[0].events)
  assert record["behavior"]["dwell_seconds"] == 86412.5


def test_a_cookie_that_is_not_ascii_is_a_401_not_a_500(serve):  # noqa: F811
  server = serve(auth="keys_or_session")
  for cookie in (b"rlhb_session=\xe9.1.x", b"rlhb_session=a.1.\xff\xfe", b"rlhb_session=\xe9"):
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=15)
    conn.putrequest("POST", "/v1/generate")
    conn.putheader("Cookie", cookie)
    conn.putheader("Content-Length", "13")
    conn.endheaders(b'{"query":"q"}')
    response = conn.getresponse()
    out = json.loads(response.read())
    conn.close()
    assert response.status == 401 and "session" in out["error"], (cookie, out)


def test_authentication_and_rate_limits_come_before_the_body_is_parsed(serve):  # noqa: F811
  """Malformed JSON from nobody is 401, and over the address rate 429 (was: 400 for both)."""
  server = serve(auth="keys", address_rate=0.01, address_burst=2)
  _, key = add_key(server.store, "k")
  assert raw(server, "POST", "/v1/feedback", b"{not json")[0] == 401
  assert raw(server, "POST", "/v1/feedback", b"{not json", bearer(key))[0] == 400
  status, out = raw(server, "POST", "/v1/generate", b"{not json", bearer(key))
  assert status == 429 and "rate limit" in out["error"]


# -- impressions and votes ------------------------------------------------------------------------


def test_a_session_reading_an_answer_by_id_may_not_react_to_it(serve, store_url):  # noqa: F811
  """The impression is the server's: it generated the answer for that identity. A session that
  reads an answer by id (anyone who learnt the id) is not shown it (was: 200, counted)."""
  server = serve(auth="keys_or_session", store_url=store_url)
  asker, reader = session(server), session(server)
  rid = generate(server, asker)
  assert call(server.port, "GET", f"/v1/responses/{rid}", None, reader)[0] == 200
  body = {"id": rid, "event_id": "like", "type": "likes"}
  assert call(server.port, "POST", "/v1/feedback", body, reader)[0] == 403
  assert call(server.port, "POST", "/v1/feedback", body, asker) == (200, {"duplicate": False})


def test_event_ids_belong_to_their_sender(serve, store_url):  # noqa: F811
  """Someone shown the same answer posts a dislike under the id the page would use for the
  honest like: the honest like still counts (was: a duplicate, and the dislike stood)."""
  server = serve(auth="keys", store_url=store_url)
  _, honest = add_key(server.store, "honest")
  _, spoiler = add_key(server.store, "spoiler")
  rid = generate(server, bearer(honest))
  assert call(server.port, "GET", f"/v1/responses/{rid}", None, bearer(spoiler))[0] == 200
  spoil = {"id": rid, "event_id": f"{rid}-likes", "type": "dislikes"}
  assert call(server.port, "POST", "/v1/feedback", spoil, bearer(spoiler))[1] == {
    "duplicate": False
  }
  like = {"id": rid, "event_id": f"{rid}-likes", "type": "likes"}
  assert call(server.port, "POST", "/v1/feedback", like, bearer(honest))[1] == {"duplicate": False}
  assert call(server.port, "POST", "/v1/feedback", like, bearer(honest))[1] == {"duplicate": True}
  (record,) = aggregate_records(server.store.read_new()[0].events, ("likes", "dislikes"))
  assert record["behavior"] == {"likes": 1, "dislikes": 1}


def test_one_vote_per_identity_and_response_across_rounds(store_url, tmp_path):
  """A like read in round 1, then a dislike and a like again: no later round counts them (was:
  each flip counted again in the next round). Inside one read a flip still replaces the vote."""
  reactions = ("likes", "dislikes")
  with open_store(store_url, tmp_path) as store:
    (rid, other) = store.add_responses(["q", "p"], [None, None], ["a", "b"], 0, ["key:a"] * 2)
    store.add_event(rid, "1", "likes", 1.0, "key:a", reactions)
    feed, cursor = store.read_new()
    assert aggregate_records(feed.events)[0]["behavior"] == {"likes": 1}
    store.add_event(rid, "2", "dislikes", 1.0, "key:a", reactions)
    store.add_event(other, "3", "likes", 1.0, "key:a", reactions)  # a first vote: it counts
    store.add_event(other, "4", "dislikes", 1.0, "key:a", reactions)  # flipped in the same read
    feed, cursor = store.read_new(cursor)
    assert [(e.response_id, e.type, e.counted) for e in feed.events] == [
      (rid, "dislikes", False),
      (other, "likes", True),
      (other, "dislikes", True),
    ]
    (record,) = aggregate_records(feed.events, reactions)
    assert record["id"] == other and record["behavior"] == {"likes": 0, "dislikes": 1}
    store.add_event(rid, "5", "likes", 1.0, "key:a", reactions)
    feed, _ = store.read_new(cursor)
    assert [e.counted for e in feed.events] == [False] and not aggregate_records(feed.events)
    # A consumer reading everything at once sees the latest reaction of each (one vote).
    everything = aggregate_records(store.read_new()[0].events, reactions)
    assert {r["id"]: r["behavior"] for r in everything} == {
      rid: {"likes": 1, "dislikes": 0},
      other: {"likes": 0, "dislikes": 1},
    }


# -- new identities cost something ----------------------------------------------------------------


def test_sessions_per_address_and_per_ipv6_64_per_day(tmp_path):
  from rlhb_jax.serving.auth import network_of

  config = ServeConfig(auth="keys_or_session", sessions_per_address_per_day=3)
  with open_store("", tmp_path) as store:
    gate = Gate(config, store)
    for group in (
      ["10.0.0.1"] * 3,
      ["2001:db8::1", "2001:db8::2", "2001:db8::ffff:1"],  # one /64: one subscriber
      ["::ffff:10.0.0.2", "10.0.0.2", "10.0.0.2"],  # IPv4-mapped: the IPv4 address
    ):
      for address in group:
        assert gate.page_session(None, address) is not None
      with pytest.raises(ServiceError) as refused:
        gate.page_session(None, group[-1])
      assert refused.value.status == 429 and "Retry-After" in refused.value.headers
    assert gate.page_session(None, "2001:db8:0:1::1") is not None  # the next /64
    assert gate.page_session(None, "10.0.0.3") is not None
    # A replica sharing the store shares the count.
    with pytest.raises(ServiceError):
      Gate(config, store).page_session(None, "10.0.0.1")
  assert network_of("2001:db8::1") == network_of("2001:db8::abcd") == "2001:db8::/64"


def test_the_session_cap_over_http(serve):  # noqa: F811
  server = serve(auth="keys_or_session", sessions_per_address_per_day=2)
  session(server)
  kept = session(server)
  assert call(server.port, "GET", "/")[0] == 429
  status, _ = call(server.port, "POST", "/v1/generate", {"query": "q"}, kept)
  assert status == 200  # the sessions it has still work
  assert session(server, "127.0.0.2")  # another address


def test_a_young_sessions_votes_are_stored_but_not_counted(serve, store_url):  # noqa: F811
  """Younger than serve.young_seconds, or shown fewer than serve.young_impressions answers: the
  vote is stored (young, not counted) and answered as any other (was: counted)."""
  server = serve(auth="keys_or_session", store_url=store_url, young_impressions=3)
  gate = server.service.gate
  fresh = session(server)
  aged = {"Cookie": f"rlhb_session={gate.sessions.issue(now=time.time() - 7200)}"}
  _, key = add_key(server.store, "key")
  answers = {}
  for name, who in (("fresh", fresh), ("aged", aged), ("key", bearer(key))):
    rids = [generate(server, who, f"q{i}") for i in range(3)]
    for rid in rids[:2]:  # after 3 answers shown: only the age tells the fresh one apart
      body = {"id": rid, "event_id": f"{name}-{rid}", "type": "likes"}
      answers[name, rid] = call(server.port, "POST", "/v1/feedback", body, who)[1]
  assert all(a == {"duplicate": False} for a in answers.values())
  events = server.store.read_new()[0].events
  counted = {(e.identity.split(":")[0], e.counted, e.young) for e in events}
  # Fresh: young by age. Aged: its votes came after 3 impressions. Keys are exempt.
  assert counted == {("session", False, True), ("session", True, False), ("key", True, False)}
  assert sum(e.counted for e in events) == 4
  early = serve(auth="keys_or_session", store_url=store_url, young_seconds=0, young_impressions=2)
  who = session(early)
  rid = generate(early, who, "first")
  body = {"id": rid, "event_id": "e", "type": "likes"}
  assert call(early.port, "POST", "/v1/feedback", body, who)[0] == 200
  generate(early, who, "second")
  body = {"id": rid, "event_id": "f", "type": "dislikes"}
  assert call(early.port, "POST", "/v1/feedback", body, who)[0] == 200
  mine = [e for e in early.store.read_new()[0].events if e.response_id == rid]
  assert [(e.type, e.young, e.counted) for e in mine] == [
    ("likes", True, False),  # one impression
    ("dislikes", False, True),  # two
  ]


def test_address_limits_are_on_beyond_loopback_and_forwarding_from_anyone_is_refused():
  assert ServeConfig().address_limit == (0.0, 50)
  public = ServeConfig(host="0.0.0.0", auth="keys")
  assert public.address_limit == (5.0, 50)
  assert ServeConfig(host="0.0.0.0", auth="keys", address_rate=0.0).address_limit[0] == 0.0
  with pytest.raises(ValueError, match="forwarded_allow_ips"):
    ServeConfig(forwarded_allow_ips="*")  # the session cap is an address limit too
  with pytest.raises(ValueError, match="forwarded_allow_ips"):
    ServeConfig(forwarded_allow_ips="*", sessions_per_address_per_day=0, address_rate=1.0)
  ServeConfig(forwarded_allow_ips="*", sessions_per_address_per_day=0)  # no limit: allowed
  ServeConfig(host="0.0.0.0", auth="keys", forwarded_allow_ips="10.0.0.2")


def test_an_ipv6_64_shares_one_address_bucket(tmp_path):
  config = ServeConfig(address_rate=0.001, address_burst=2)
  with open_store("", tmp_path) as store:
    gate = Gate(config, store)
    gate.limit_address("2001:db8::1")
    gate.limit_address("2001:db8::2")
    with pytest.raises(ServiceError):
      gate.limit_address("2001:db8::3")
    gate.limit_address("2001:db8:0:1::3")


def test_addresses_are_stored_as_a_keyed_hash(serve, store_url):  # noqa: F811
  server = serve(auth="keys", store_url=store_url)
  _, key = add_key(server.store, "k")
  rid = generate(server, bearer(key))
  body = {"id": rid, "event_id": "e", "type": "likes"}
  assert call(server.port, "POST", "/v1/feedback", body, bearer(key))[0] == 200
  (event,) = server.store.read_new()[0].events
  gate = server.service.gate
  assert event.address == gate.address_key("127.0.0.1") != gate.address_key("127.0.0.2")
  assert len(event.address) == 16 and "127" not in event.address


# -- the store ------------------------------------------------------------------------------------


def test_the_store_file_is_readable_by_its_owner_only(tmp_path):
  old = os.umask(0o022)
  try:
    with open_store("", tmp_path) as store:
      store.secret("s", lambda: "x")
      for name in ("feedback.db", "feedback.db-wal"):
        assert stat.S_IMODE(os.stat(tmp_path / name).st_mode) == 0o600, name
    (tmp_path / "old.db").touch(0o644)
    with open_store(str(tmp_path / "old.db")):
      assert stat.S_IMODE(os.stat(tmp_path / "old.db").st_mode) == 0o600
  finally:
    os.umask(old)


def test_rotating_the_session_secret_refuses_every_older_session(serve, tmp_path):  # noqa: F811
  from rlhb_jax.config import Config
  from rlhb_jax.jobs import config as jobs_config
  from rlhb_jax.jobs import keys

  server = serve(auth="keys_or_session", reload_poll_seconds=0.1)
  old = session(server)
  assert call(server.port, "POST", "/v1/generate", {"query": "q"}, old)[0] == 200
  cfg = Config(api_keys=jobs_config.KeysConfig(action="rotate_sessions"))
  assert keys.run(cfg, tmp_path) == {"rotated": "session_secret"}
  deadline = time.monotonic() + 10
  while call(server.port, "POST", "/v1/generate", {"query": "q"}, old)[0] != 401:
    assert time.monotonic() < deadline, "the rotated secret was not picked up"
    time.sleep(0.05)
  new = session(server)
  assert call(server.port, "POST", "/v1/generate", {"query": "q"}, new)[0] == 200


def test_sessions_need_a_secure_cookie_beyond_loopback():
  with pytest.raises(ValueError, match="cookie_secure"):
    ServeConfig(host="0.0.0.0", auth="keys_or_session")
  ServeConfig(host="0.0.0.0", auth="keys_or_session", cookie_secure=True)
  ServeConfig(host="0.0.0.0", auth="keys")  # no cookie: nothing to secure


# -- what ingestion sees --------------------------------------------------------------------------


def event(seq, identity, kind="likes", rid="r0", young=False, address="", query="q", text="a"):
  return EventRow(
    seq,
    f"e{seq}",
    rid,
    kind,
    1.0,
    "t",
    query,
    text,
    None,
    0,
    identity,
    not young,
    None,
    address,
    young,
  )


def test_the_volume_rule_is_not_moved_by_fresh_identities():
  """Issue #39's scenario: 50 one-like sessions made the median identity 1 event, so an honest
  key with 150 events was flagged (volume > 10 x 1 and > 100). The median is now over established
  identities (not young), and the 50 are seen for what they are: a burst on one answer."""
  events = [event(i, "key:heavy", "clicks", rid=f"r{i}") for i in range(150)]
  events += [event(1000 + i, f"key:k{i % 3}", "clicks", rid=f"r{i}") for i in range(60)]
  sybils = [event(2000 + i, f"session:s{i}", rid=f"x{i}", young=True) for i in range(50)]
  screened = ingest.screen(events + sybils, IngestConfig())
  assert "key:heavy" not in screened.flagged
  assert set(screened.flagged) == {f"session:s{i}" for i in range(50)}
  assert all(why.startswith("burst") for why in screened.flagged.values())
  assert screened.bursts == {"'q' -> 'a'": 50}
  assert screened.median_events == 20  # the old median, over every identity, was 1
  heavy_alone = ingest.screen(events + sybils[:1], IngestConfig())
  assert "key:heavy" not in heavy_alone.flagged and not heavy_alone.bursts


def test_bursts_on_one_answer_and_from_one_address_are_flagged_and_their_events_set_aside():
  cfg = IngestConfig(burst_identities=5, address_identities=4)
  honest = [event(i, f"key:h{i}", rid=f"h{i}", query=f"q{i}") for i in range(20)]
  honest += [event(100 + i, f"key:h{i}", "clicks", rid=f"h{i}", query=f"q{i}") for i in range(20)]
  # Four young sessions on one answer (under 5), but all four from one address (4: a burst).
  crowd = [
    event(200 + i, f"session:c{i}", rid=f"c{i}", young=True, address="ab12") for i in range(4)
  ]
  # Five one-event (aged) sessions liking one answer under five response ids.
  one_shot = [event(300 + i, f"session:o{i}", rid=f"o{i}", text="wrong") for i in range(5)]
  screened = ingest.screen(honest + crowd + one_shot, cfg)
  assert set(screened.flagged) == {e.identity for e in crowd + one_shot}
  assert screened.crowded == {"ab12": 4} and screened.bursts == {"'q' -> 'wrong'": 5}
  assert screened.kept == honest and len(screened.quarantined) == 9
  report = ingest.summary(screened)
  assert report["bursts"] == {"'q' -> 'wrong'": 5} and report["young_identities"] == 4
