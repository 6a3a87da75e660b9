"""Who may steer the model (issue #24): API keys, sessions, impressions, one vote, rate limits.

The HTTP tests run on real 127.0.0.1 sockets against the SQLite and the PostgreSQL store (the
`store_url` fixture); no JAX.
"""

import collections
import concurrent.futures
import http.client
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
from test_server import REPO, call

from rlhb_jax.serving import (
  EchoPolicy,
  ServeConfig,
  add_key,
  aggregate_records,
  make_server,
  open_store,
)
from rlhb_jax.serving.auth import Sessions, hash_key
from rlhb_jax.serving.limits import RateLimiter


def bearer(key):
  return {"Authorization": f"Bearer {key}"}


@pytest.fixture
def serve(tmp_path):
  """Factory: serve(**ServeConfig overrides) -> a started server with an echo policy."""
  servers = []

  def start(**overrides):
    config = ServeConfig(**(dict(port=0, batch_timeout_ms=1.0, reload_poll_seconds=60) | overrides))
    server = make_server(config, tmp_path, EchoPolicy()).start()
    servers.append(server)
    return server

  yield start
  for server in servers:
    server.shutdown()


def generate(server, headers, query="capital of Peru?"):
  status, out = call(server.port, "POST", "/v1/generate", {"query": query}, headers)
  assert status == 200, out
  return out["id"]


def test_one_thousand_likes_from_one_identity_count_once(serve, store_url):
  server = serve(auth="keys", store_url=store_url, identity_rate=0.0)
  _, key = add_key(server.store, "attacker")
  rid = generate(server, bearer(key))
  conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=15)
  answers = []
  for i in range(1000):
    body = {"id": rid, "event_id": f"like-{i}", "type": "like"}
    answers.append(call(server.port, "POST", "/v1/feedback", body, bearer(key), conn=conn))
  conn.close()
  assert answers[0] == (200, {"duplicate": False})
  assert all(a == (200, {"duplicate": True}) for a in answers[1:])
  feed, _ = server.store.read_new()
  # All 1,000 are stored (their volume is evidence), one counts.
  assert len(feed.events) == 1000
  assert sum(e.counted for e in feed.events) == 1
  (record,) = aggregate_records(feed.events, ("impressions", "likes"))
  assert record["behavior"] == {"impressions": 0, "likes": 1}
  assert record["meta"]["identities"] == 1
  # Without the store's rule (as if written by another producer), the aggregation cap still holds.
  uncounted = [type(e)(**{**e.__dict__, "counted": True}) for e in feed.events]
  assert aggregate_records(uncounted, ("likes",))[0]["behavior"]["likes"] == 1
  assert aggregate_records(uncounted, ("likes",), cap=False)[0]["behavior"]["likes"] == 1000


def test_a_dislike_after_a_like_replaces_it_and_statistics_count_identities(serve, store_url):
  server = serve(auth="keys", store_url=store_url)
  keys = [add_key(server.store, f"user-{i}")[1] for i in range(3)]
  rid = generate(server, bearer(keys[0]))
  for key in keys[1:]:  # the others open the answer the first one asked for
    status, shown = call(server.port, "GET", f"/v1/responses/{rid}", None, bearer(key))
    assert status == 200 and shown["response"] == "answer to capital of Peru?"
  steps = [
    (0, "like", False),
    (0, "dislike", False),  # replaces the like
    (0, "dislike", True),  # a repeat
    (1, "like", False),
    (1, "like", True),
    (2, "like", False),
    (2, "impression", False),
  ]
  for i, (user, kind, duplicate) in enumerate(steps):
    body = {"id": rid, "event_id": f"e{i}", "type": kind}
    out = call(server.port, "POST", "/v1/feedback", body, bearer(keys[user]))
    assert out == (200, {"duplicate": duplicate}), (i, out)
  # A vote is one: a like worth 5 is refused; a measure (dwell_seconds) takes its value.
  body = {"id": rid, "event_id": "big", "type": "like", "value": 5}
  status, out = call(server.port, "POST", "/v1/feedback", body, bearer(keys[2]))
  assert status == 422 and "one vote" in out["error"]
  body = {"id": rid, "event_id": "dwell", "type": "dwell", "value": 12.5}
  assert call(server.port, "POST", "/v1/feedback", body, bearer(keys[2])) == (
    200,
    {"duplicate": False},
  )
  feed, _ = server.store.read_new()
  (record,) = aggregate_records(feed.events, ("impressions", "likes", "dislikes"))
  assert record["behavior"] == {"impressions": 1, "likes": 2, "dislikes": 1, "dwell_seconds": 12.5}
  assert record["meta"]["identities"] == 3
  replaced = [e for e in feed.events if e.replaces is not None]
  assert [(e.type, e.identity) for e in replaced] == [("dislikes", feed.events[0].identity)]
  assert replaced[0].replaces == feed.events[0].seq


def test_feedback_on_a_response_not_shown_is_403(serve, store_url):
  server = serve(auth="keys", store_url=store_url)
  (_, alice), (_, bob) = add_key(server.store, "alice"), add_key(server.store, "bob")
  rid = generate(server, bearer(alice))
  body = {"id": rid, "event_id": "bob-like", "type": "like"}
  status, out = call(server.port, "POST", "/v1/feedback", body, bearer(bob))
  assert status == 403 and "not shown" in out["error"]
  assert server.store.counts()["events"] == 0  # nothing stored
  # A response id nobody served is still a 404; once bob is shown the answer, his like counts.
  status, _ = call(server.port, "POST", "/v1/feedback", body | {"id": "nope"}, bearer(bob))
  assert status == 404
  assert call(server.port, "GET", f"/v1/responses/{rid}", None, bearer(bob))[0] == 200
  assert call(server.port, "GET", "/v1/responses/nope", None, bearer(bob))[0] == 404
  assert call(server.port, "POST", "/v1/feedback", body, bearer(bob)) == (200, {"duplicate": False})


def test_no_key_a_wrong_key_and_a_revoked_key_are_401(serve, store_url):
  server = serve(auth="keys", store_url=store_url)
  key_id, key = add_key(server.store, "alice")
  rid = generate(server, bearer(key))
  conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=15)
  for headers in ({}, bearer("rlhb-not-a-key"), {"Authorization": f"Basic {key}"}):
    for method, path, body in (
      ("POST", "/v1/generate", {"query": "q"}),
      ("POST", "/v1/feedback", {"id": rid, "event_id": "x", "type": "like"}),
      ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "q"}]}),
      ("GET", f"/v1/responses/{rid}", None),
    ):
      conn.request(method, path, json.dumps(body) if body else None, headers)
      response = conn.getresponse()
      assert response.status == 401, (headers, path)
      assert response.getheader("WWW-Authenticate", "").startswith("Bearer")
      assert json.loads(response.read())["error"]
  conn.close()
  body = {"id": rid, "event_id": "before", "type": "like"}
  assert call(server.port, "POST", "/v1/feedback", body, bearer(key))[0] == 200
  assert server.store.revoke_key(key_id) is True
  assert server.store.revoke_key(key_id) is False  # already revoked
  status, out = call(server.port, "POST", "/v1/feedback", body | {"event_id": "after"}, bearer(key))
  assert status == 401 and "revoked" in out["error"]
  assert call(server.port, "POST", "/v1/generate", {"query": "q"}, bearer(key))[0] == 401
  feed, _ = server.store.read_new()
  assert [e.event_id for e in feed.events] == ["before"]
  # The store keeps the key's hash, never the key.
  assert server.store.key_id(hash_key(key)) is None
  assert key not in json.dumps([r.__dict__ for r in server.store.list_keys()])


def test_a_burst_over_the_limit_gets_429s_and_loses_nothing_accepted(serve, store_url):
  server = serve(auth="keys", store_url=store_url, identity_rate=2.0, identity_burst=10)
  _, key = add_key(server.store, "bursty")
  rid = generate(server, bearer(key))  # takes one token

  def post(i):
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=15)
    body = json.dumps({"id": rid, "event_id": f"b{i}", "type": "impression" if i else "like"})
    conn.request("POST", "/v1/feedback", body, bearer(key))
    response = conn.getresponse()
    out = (i, response.status, response.getheader("Retry-After"), json.loads(response.read()))
    conn.close()
    return out

  start = time.monotonic()
  with concurrent.futures.ThreadPoolExecutor(8) as pool:
    answers = list(pool.map(post, range(40)))
  refilled = 2.0 * (time.monotonic() - start)
  ok = [i for i, status, _, _ in answers if status == 200]
  refused = [(i, after, out) for i, status, after, out in answers if status == 429]
  assert len(ok) + len(refused) == 40
  assert 9 <= len(ok) <= 9 + refilled + 1  # the burst (9 tokens left), plus what refilled
  assert all(int(after) >= 1 and "rate limit" in out["error"] for _, after, out in refused)
  feed, _ = server.store.read_new()
  assert {e.event_id for e in feed.events} == {f"b{i}" for i in ok}  # every 200 is stored
  # A refused event, retried after Retry-After, is accepted.
  i, after, _ = refused[0]
  time.sleep(int(after))
  assert post(i)[1] == 200
  # The OpenAI-compatible endpoint takes tokens from the same bucket.
  chat = {"messages": [{"role": "user", "content": "q"}]}
  statuses = [
    call(server.port, "POST", "/v1/chat/completions", chat, bearer(key))[0] for _ in range(8)
  ]
  assert 429 in statuses


def test_the_client_address_is_limited_whatever_key_it_uses(serve):
  server = serve(auth="keys", address_rate=0.5, address_burst=5, identity_rate=0.0)
  keys = [add_key(server.store, f"k{i}")[1] for i in range(10)]
  statuses = [
    call(server.port, "POST", "/v1/generate", {"query": "q"}, bearer(key))[0] for key in keys
  ]
  assert statuses == [200] * 5 + [429] * 5
  # Also before the key is looked at: guessing keys is slowed as well.
  assert call(server.port, "POST", "/v1/generate", {"query": "q"}, bearer("guess"))[0] == 429


def test_the_page_gets_a_signed_httponly_session(serve, store_url):
  server = serve(auth="keys_or_session", store_url=store_url, cookie_secure=True)
  conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=15)
  conn.request("GET", "/")
  response = conn.getresponse()
  response.read()
  cookie = response.getheader("Set-Cookie")
  assert cookie.startswith("rlhb_session=")
  assert {"HttpOnly", "Secure", "SameSite=strict"} <= {p.strip() for p in cookie.split(";")}
  session = {"Cookie": cookie.split(";")[0]}
  # The page's own calls: generate, then react, as that session.
  rid = generate(server, session)
  body = {"id": rid, "event_id": f"{rid}-likes", "type": "likes"}
  assert call(server.port, "POST", "/v1/feedback", body, session) == (200, {"duplicate": False})
  # Another session was not shown it; a forged or tampered cookie is no session at all.
  conn.request("GET", "/")
  other = conn.getresponse()
  other.read()
  other_session = {"Cookie": other.getheader("Set-Cookie").split(";")[0]}
  assert other_session != session
  assert call(server.port, "POST", "/v1/feedback", body, other_session)[0] == 403
  sid, issued, sig = session["Cookie"].split("=", 1)[1].split(".")
  for forged in (f"{sid}.{issued}.{'0' * 32}", f"{'a' * 32}.{issued}.{sig}", "x"):
    status, out = call(
      server.port, "POST", "/v1/generate", {"query": "q"}, {"Cookie": f"rlhb_session={forged}"}
    )
    assert status == 401 and "session" in out["error"]
  # A page that already holds a valid session gets no new cookie.
  conn.request("GET", "/", headers=session)
  again = conn.getresponse()
  again.read()
  assert again.getheader("Set-Cookie") is None
  conn.close()
  # Keys work beside sessions.
  _, key = add_key(server.store, "script")
  assert call(server.port, "POST", "/v1/generate", {"query": "q"}, bearer(key))[0] == 200


def test_sessions_expire_and_the_secret_is_the_stores(tmp_path):
  sessions = Sessions("secret", max_age=60)
  cookie = sessions.issue(now=1000)
  assert sessions.identity(cookie, now=1059).startswith("session:")
  assert sessions.identity(cookie, now=1061) is None
  assert Sessions("other", max_age=60).identity(cookie, now=1000) is None
  with open_store("", tmp_path) as a, open_store("", tmp_path) as b:  # two replicas, one store
    assert a.secret("s", lambda: "first") == b.secret("s", lambda: "second") == "first"


def test_rate_limiter_refills_and_forgets_full_buckets():
  now = [0.0]
  limiter = RateLimiter(rate=2.0, burst=3, max_keys=2, clock=lambda: now[0])
  assert [limiter.take("a") for _ in range(3)] == [0.0, 0.0, 0.0]
  assert limiter.take("a") == pytest.approx(0.5)
  now[0] = 0.25
  assert limiter.take("a") == pytest.approx(0.25)  # half a token refilled
  now[0] = 0.5
  assert limiter.take("a") == 0.0
  limiter.take("b")
  now[0] = 10.0
  limiter.take("c")  # three keys: the full ones ("a", "b") are forgotten
  assert set(limiter._buckets) == {"c"}
  assert RateLimiter(rate=0.0, burst=0).take("x") == 0.0  # no limit


def test_serve_config_refuses_an_open_host_without_auth():
  with pytest.raises(ValueError, match="auth=none"):
    ServeConfig(host="0.0.0.0")
  assert ServeConfig(host="0.0.0.0", auth="keys").auth == "keys"
  assert ServeConfig(host="::1").auth == "none"  # loopback
  with pytest.raises(ValueError, match="auth"):
    ServeConfig(auth="password")
  with pytest.raises(ValueError, match="burst"):
    ServeConfig(identity_rate=1.0, identity_burst=0)
  with pytest.raises(ValueError, match="reaction_types"):
    ServeConfig(reaction_types=("likes", "hugs"))


def test_keys_mode_adds_lists_and_revokes(tmp_path, serve):
  """The command line: add prints the key once; list shows no secret; revoke refuses it."""
  workdir = tmp_path / "run"
  base = [
    sys.executable,
    "-m",
    "rlhb_jax.main",
    f"--config={os.path.join(REPO, 'configs/base.py')}",
  ]
  base += [f"--workdir={workdir}", "--config.mode=keys"]

  def cli(*flags):
    return subprocess.run([*base, *flags], cwd=REPO, capture_output=True, text=True, timeout=120)

  added = cli("--config.api_keys.action=add", "--config.api_keys.name=alice")
  assert added.returncode == 0, added.stderr
  key = next(
    line.split(": ", 1)[1] for line in added.stdout.splitlines() if line.startswith("key:")
  )
  key_id = added.stdout.split("key id: ", 1)[1].split()[0]
  server = serve(auth="keys", store_url=str(workdir / "feedback.db"))
  assert call(server.port, "POST", "/v1/generate", {"query": "q"}, bearer(key))[0] == 200
  listed = cli("--config.api_keys.action=list")
  assert listed.returncode == 0 and key_id in listed.stdout and "active" in listed.stdout
  assert key not in listed.stdout
  revoked = cli("--config.api_keys.action=revoke", f"--config.api_keys.id={key_id}")
  assert revoked.returncode == 0, revoked.stderr
  assert call(server.port, "POST", "/v1/generate", {"query": "q"}, bearer(key))[0] == 401
  again = cli("--config.api_keys.action=revoke", f"--config.api_keys.id={key_id}")
  assert again.returncode == 2 and "no active key" in again.stderr
  nameless = cli("--config.api_keys.action=add")
  assert nameless.returncode == 2 and "name" in nameless.stderr


def test_concurrent_identified_votes_lose_nothing_and_count_once(serve, store_url):
  """8 clients, each with its own key, race votes on shared answers: every 200 is stored, and the
  store's counted votes are exactly one per identity, response and type (latest reaction)."""
  server = serve(auth="keys", store_url=store_url, identity_rate=0.0, batch_max_size=8)
  keys = [add_key(server.store, f"c{k}")[1] for k in range(8)]
  rids = [generate(server, bearer(keys[k % 8]), f"q{k}") for k in range(6)]
  for key in keys:
    for rid in rids:
      assert call(server.port, "GET", f"/v1/responses/{rid}", None, bearer(key))[0] == 200

  def work(k):
    rng = np.random.default_rng(k)
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=15)
    answered = []
    for i in range(60):
      rid = rids[rng.integers(len(rids))]
      kind = ("like", "dislike", "click")[rng.integers(3)]
      body = {"id": rid, "event_id": f"c{k}-{i}", "type": kind}
      status, out = call(server.port, "POST", "/v1/feedback", body, bearer(keys[k]), conn=conn)
      answered.append((body["event_id"], status, out))
      if i % 10 == 9:  # a retry of an acknowledged event: a duplicate, stored once
        status, out = call(server.port, "POST", "/v1/feedback", body, bearer(keys[k]), conn=conn)
        assert (status, out) == (200, {"duplicate": True})
    conn.close()
    return answered

  with concurrent.futures.ThreadPoolExecutor(8) as pool:
    answered = [a for thread in pool.map(work, range(8)) for a in thread]
  assert {status for _, status, _ in answered} == {200}
  feed, _ = server.store.read_new()
  stored = {e.event_id: e for e in feed.events}
  assert len(stored) == len(feed.events) == len(answered)  # every 200 stored, retries not again
  for event_id, _, out in answered:
    assert stored[event_id].counted is not out["duplicate"]
  latest, clicks = {}, collections.Counter()
  for e in feed.events:  # seq order: what the store decided, replayed
    if e.counted and e.type == "clicks":
      clicks[(e.identity, e.response_id)] += 1
    elif e.counted:
      held = latest.get((e.identity, e.response_id))
      assert held is None or held.type != e.type
      assert e.replaces == (held.seq if held else None)
      latest[(e.identity, e.response_id)] = e
  assert set(clicks.values()) == {1}
  for record in aggregate_records(feed.events, ("likes", "dislikes", "clicks")):
    mine = [e for (_, rid), e in latest.items() if rid == record["id"]]
    assert record["behavior"]["likes"] == sum(e.type == "likes" for e in mine)
    assert record["behavior"]["dislikes"] == sum(e.type == "dislikes" for e in mine)
    assert record["behavior"]["clicks"] == sum(
      n for (_, rid), n in clicks.items() if rid == record["id"]
    )
