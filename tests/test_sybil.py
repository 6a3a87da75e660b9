"""Issue #39's Sybil attack, measured: one client mints page sessions and likes one wrong answer as
fast as it can, from one address or from 8 loopback addresses, while honest users work on other
answers; on the SQLite and the PostgreSQL store.

The server runs with the documented public settings (docs/SERVING.md, "A public deployment":
`address_rate=5`, `address_burst=50`, `cookie_secure`) and the defaults of #39: 20 new sessions per
address a day, a session's votes counted once it is an hour old and was shown 3 answers. Every
fresh identity can like only the answer the server generated for it (a new response id each time,
the same text: the echo policy's "answer to <query>"), so the likes on "that answer" are counted
over every response with its query and text, as the trainer sees them (`aggregate_records`).

What must hold: counted likes on the wrong answer stay at most the young-identity cap
(`YOUNG_CAP`: none of a young session's votes count), not hundreds; `inspect_logs` flags the burst;
every event of the honest users is stored, and those of users past the young rule (sessions an
hour old, shown 3 answers, and API keys) are counted. `RLHB_SYBIL_SECONDS` shortens the 60 s.
"""

import collections
import http.client
import json
import os
import threading
import time

import pytest

from rlhb_jax.config import Config
from rlhb_jax.jobs import inspect_logs
from rlhb_jax.serving import EchoPolicy, ServeConfig, add_key, aggregate_records, make_server

SECONDS = float(os.environ.get("RLHB_SYBIL_SECONDS", "60"))
WRONG = "Who won the 1998 World Cup?"  # the attacked query; the echo policy's answer to it
YOUNG_CAP = 5  # what the issue allows at most: likes of young identities counted on one answer
PUBLIC = dict(address_rate=5.0, address_burst=50, cookie_secure=True)
HONEST_ADDRESS = "127.0.1.1"  # the honest users' own address: the attacker's limits are not theirs


class Client:
  """A keep-alive HTTP client bound to one source address (127.0.0.x are all this machine)."""

  def __init__(self, port, address):
    self.port, self.address = port, address
    self.conn = None

  def request(self, method, path, body=None, headers=None):
    """(status, JSON answer or None, response headers); reconnects after a closed connection."""
    for attempt in range(2):
      if self.conn is None:
        self.conn = http.client.HTTPConnection(
          "127.0.0.1", self.port, timeout=30, source_address=(self.address, 0)
        )
      try:
        data = None if body is None else json.dumps(body)
        self.conn.request(method, path, body=data, headers=headers or {})
        response = self.conn.getresponse()
        raw = response.read()
        out = json.loads(raw) if response.getheader("Content-Type") == "application/json" else None
        return response.status, out, response
      except (ConnectionError, http.client.HTTPException):
        self.conn.close()
        self.conn = None
        if attempt:
          raise
    raise AssertionError("unreachable")


def attacker(port, address, deadline, tally):
  """Mints a session, asks the wrong answer's query, likes the answer; again, as fast as it can.
  Once the address has its sessions of the day, it goes on with the sessions it has: each asks
  again (a new response id, the same answer) and likes again."""
  client = Client(port, address)
  sessions = []
  capped = False  # the address had its sessions of the day (Retry-After: an hour)
  n = 0
  while time.monotonic() < deadline:
    n += 1
    status = 0
    if not capped:
      status, _, response = client.request("GET", "/")
      tally[f"GET / {status}"] += 1
      if status == 200:
        sessions.append({"Cookie": response.getheader("Set-Cookie").split(";")[0]})
      capped = status == 429 and int(response.getheader("Retry-After")) >= 3600
    if not sessions:
      time.sleep(0.01)
      continue
    who = sessions[-1] if status == 200 else sessions[n % len(sessions)]
    status, answer, _ = client.request("POST", "/v1/generate", {"query": WRONG}, who)
    tally[f"generate {status}"] += 1
    if status != 200:
      time.sleep(0.01)  # a 429: straight back at it, short of spinning
      continue
    like = {"id": answer["id"], "event_id": f"{address}-{n}", "type": "likes"}
    while time.monotonic() < deadline:  # the like is what it is here for: retried on a 429
      status, _, _ = client.request("POST", "/v1/feedback", like, who)
      tally[f"like {status}"] += 1
      if status != 429:
        break
      time.sleep(0.01)


def honest_users(server, deadline, sent, keys):
  """Three aged sessions and two API keys, taking turns to ask their own questions and react to
  the answers at a person's pace; every event acknowledged is put in `sent`."""
  gate = server.service.gate
  aged = [
    {"Cookie": f"rlhb_session={gate.sessions.issue(now=time.time() - 7200)}"} for _ in range(3)
  ]
  people = aged + [{"Authorization": f"Bearer {key}"} for key in keys]
  client = Client(server.port, HONEST_ADDRESS)
  n = 0
  while time.monotonic() < deadline:
    n += 1
    who = people[n % len(people)]
    status, answer, _ = client.request(
      "POST", "/v1/generate", {"query": f"honest question {n}"}, who
    )
    assert status == 200, answer
    for kind in ("impressions", "likes" if n % 3 else "dislikes"):
      body = {"id": answer["id"], "event_id": f"h{n}-{kind}", "type": kind}
      status, out, _ = client.request("POST", "/v1/feedback", body, who)
      assert status == 200 and out == {"duplicate": False}, out
      sent.append((answer["id"], kind))
    time.sleep(1.0)  # three requests a second: under the address rate, as a person is


@pytest.mark.slow
@pytest.mark.parametrize("addresses", [1, 8])
def test_sybil_sessions_cannot_buy_likes(tmp_path, store_url, addresses, capsys):
  config = ServeConfig(
    port=0, auth="keys_or_session", store_url=store_url, sqlite_synchronous="NORMAL", **PUBLIC
  )
  server = make_server(config, tmp_path, EchoPolicy()).start()
  try:
    keys = [add_key(server.store, f"honest-{i}")[1] for i in range(2)]
    deadline = time.monotonic() + SECONDS
    tally, sent = collections.Counter(), []
    threads = [
      threading.Thread(target=attacker, args=(server.port, f"127.0.0.{i + 1}", deadline, tally))
      for i in range(addresses)
    ]
    threads.append(threading.Thread(target=honest_users, args=(server, deadline, sent, keys)))
    failures = []
    for t in threads:
      t.run = _reporting(t.run, failures)
      t.start()
    for t in threads:
      t.join()
    assert not failures, failures
    feed, _ = server.store.read_new()
  finally:
    server.shutdown()

  records = aggregate_records(feed.events, ("impressions", "likes", "dislikes"))
  counted = sum(r["behavior"]["likes"] for r in records if r["query"] == WRONG)
  stored = sum(e.type == "likes" for e in feed.events if e.query == WRONG)
  minted = tally["GET / 200"]
  honest = [e for e in feed.events if e.query != WRONG]
  kind = "postgresql" if store_url.startswith("postgresql") else "sqlite"
  with capsys.disabled():  # before the asserts: what the attack got, whatever holds
    print(
      f"\nsybil[{kind}, {addresses} address(es), {SECONDS:g} s]: {minted} sessions minted, "
      f"{dict(tally)}; likes on the wrong answer: {stored} stored, {counted} counted; honest: "
      f"{len(honest)} events stored, {sum(e.counted for e in honest)} counted"
    )
  # Honest users: every event stored; the sessions past the young rule and the keys counted. An
  # aged session's first answers come before its third impression: those votes are young.
  assert sorted((e.response_id, e.type) for e in honest) == sorted(sent)
  young_honest = [e for e in honest if e.young]
  assert all(e.identity.startswith("session:") for e in young_honest)
  assert len(young_honest) <= 2 * 3 * 2  # 3 aged sessions, at most 2 answers each before the 3rd
  assert all(e.counted for e in honest if not e.young)
  honest_records = [r for r in records if r["query"] != WRONG]
  assert sum(r["behavior"]["likes"] + r["behavior"]["dislikes"] for r in honest_records) == sum(
    e.type in ("likes", "dislikes") for e in honest if not e.young
  )

  # The attacker: its sessions are capped per address a day, and none of their votes count.
  assert minted <= 20 * addresses
  assert counted <= YOUNG_CAP and counted == 0
  assert stored >= 10  # its likes are stored (for the record), not counted

  # inspect_logs sees the burst: the young identities on one answer, and from each address.
  cfg = Config(serve=config)
  capsys.readouterr()
  report = inspect_logs.inspect_store(cfg, tmp_path)
  printed = capsys.readouterr().out
  wrong = f"'{WRONG}' -> 'answer to {WRONG}'"
  attackers = {e.identity for e in feed.events if e.query == WRONG}
  assert len(attackers) >= 10 and report["bursts"] == {wrong: len(attackers)}
  flagged = set(report["flagged"])
  assert flagged == attackers and "burst:" in printed  # no honest user among them
  # An address that got its 20 sessions (its young identities) is reported as well.
  per_address = collections.defaultdict(set)
  for e in feed.events:
    if e.identity in attackers:
      per_address[e.address].add(e.identity)
  crowded = {a: len(who) for a, who in per_address.items() if len(who) >= 20}
  assert report["crowded_addresses"] == crowded
  print(
    f"sybil[{kind}, {addresses} address(es)]: honest events {len(young_honest)} young; "
    f"inspect_logs: {len(flagged)} identities flagged, bursts {report['bursts']}, addresses "
    f"{list(report['crowded_addresses'].values())}"
  )


def _reporting(run, failures):
  def wrapped():
    try:
      run()
    except BaseException as e:  # noqa: BLE001 - reported by the test thread
      failures.append(repr(e))

  return wrapped
