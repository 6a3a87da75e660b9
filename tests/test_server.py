"""The HTTP server on real 127.0.0.1 sockets: endpoints, errors, batching, reload, load, SIGKILL.

No JAX here: the policies are deterministic fakes.
"""

import collections
import http.client
import json
import os
import random
import select
import signal
import subprocess
import sys
import threading
import time

import pytest

from rlhb_jax.serving import EchoPolicy, ServeConfig, make_server, open_store, start_cursor

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAX_BODY = 4096


def call(port, method, path, body=None, headers=None, conn=None):
  """One request; returns (status, decoded JSON body). Reuses `conn` when given (keep-alive)."""
  own = conn is None
  conn = conn or http.client.HTTPConnection("127.0.0.1", port, timeout=15)
  if isinstance(body, dict | list):
    body = json.dumps(body)
  try:
    conn.request(method, path, body=body, headers=headers or {})
    response = conn.getresponse()
    return response.status, json.loads(response.read())
  finally:
    if own:
      conn.close()


@pytest.fixture
def serve(tmp_path):
  """Factory: serve(policy=..., **ServeConfig overrides) -> a started in-process server."""
  servers = []

  def start(policy=None, **overrides):
    options = dict(port=0, max_body_bytes=MAX_BODY, batch_timeout_ms=2.0, reload_poll_seconds=60)
    config = ServeConfig(**(options | overrides))
    server = make_server(config, tmp_path, policy or EchoPolicy()).start()
    servers.append(server)
    return server

  yield start
  for server in servers:
    server.shutdown()


def test_endpoints(serve):
  server = serve()
  port = server.port
  assert call(port, "GET", "/healthz") == (200, {"status": "ok", "model_step": 0})
  status, out = call(port, "POST", "/v1/generate", {"query": "capital of Peru?"})
  assert status == 200 and set(out) == {
    "id",
    "response",
    "model_step",
    "behavior",
    "context",
    "source",
  }
  assert out["response"] == "answer to capital of Peru?"
  assert (out["model_step"], out["behavior"], out["context"]) == (0, None, "")
  status, _ = call(port, "POST", "/v1/generate", {"query": "2+2?", "behavior": "many liked it"})
  assert status == 200
  event = {"id": out["id"], "event_id": "e1", "type": "likes"}
  assert call(port, "POST", "/v1/feedback", event) == (200, {"duplicate": False})
  assert call(port, "POST", "/v1/feedback", event) == (200, {"duplicate": True})
  dwell = {"id": out["id"], "event_id": "e2", "type": "dwell_seconds", "value": 12.5}
  assert call(port, "POST", "/v1/feedback", dwell) == (200, {"duplicate": False})
  stats = {"responses": 2, "feedback_events": 2, "model_step": 0}
  assert call(port, "GET", "/v1/stats?verbose=1") == (200, stats)
  feed, _ = server.store.read_new()
  assert [r.behavior for r in feed.responses] == [None, "many liked it"]
  assert [(e.type, e.value) for e in feed.events] == [("likes", 1.0), ("dwell_seconds", 12.5)]


def _bad_requests(rid):
  """(name, method, path, body, expected status) for every documented error."""
  ok = {"id": rid, "event_id": "x", "type": "likes"}
  return [
    ("malformed json", "POST", "/v1/feedback", '{"id": ', 400),
    ("invalid utf-8", "POST", "/v1/generate", b'{"query": "\xff"}', 400),
    ("not an object", "POST", "/v1/generate", "[1, 2]", 422),
    ("missing query", "POST", "/v1/generate", {"behavior": "x"}, 422),
    ("empty query", "POST", "/v1/generate", {"query": "  "}, 422),
    ("mistyped query", "POST", "/v1/generate", {"query": 3}, 422),
    ("mistyped behavior", "POST", "/v1/generate", {"query": "q", "behavior": ["x"]}, 422),
    ("missing event_id", "POST", "/v1/feedback", {"id": rid, "type": "likes"}, 422),
    ("unknown type", "POST", "/v1/feedback", ok | {"type": "hugs"}, 422),
    ("bool value", "POST", "/v1/feedback", ok | {"value": True}, 422),
    ("string value", "POST", "/v1/feedback", ok | {"value": "1"}, 422),
    ("negative value", "POST", "/v1/feedback", ok | {"value": -1}, 422),
    (
      "nan value",
      "POST",
      "/v1/feedback",
      f'{{"id": "{rid}", "event_id": "x", "type": "likes", "value": NaN}}',
      422,
    ),
    ("unknown id", "POST", "/v1/feedback", ok | {"id": "nope"}, 404),
    ("too big", "POST", "/v1/generate", {"query": "q" * MAX_BODY}, 413),
    ("unknown path", "GET", "/v2/stats", None, 404),
    ("wrong method", "GET", "/v1/generate", None, 405),
    ("wrong method with body", "PUT", "/v1/feedback", ok, 405),
    ("post to stats", "POST", "/v1/stats", {}, 405),
    ("post to the page", "POST", "/", {"query": "q"}, 405),
  ]


def test_bad_requests_get_documented_status_and_keep_the_connection_usable(serve):
  server = serve()
  _, out = call(server.port, "POST", "/v1/generate", {"query": "q"})
  conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=15)
  for name, method, path, body, expected in _bad_requests(out["id"]):
    status, answer = call(server.port, method, path, body, conn=conn)
    assert (name, status) == (name, expected)
    assert isinstance(answer["error"], str) and answer["error"]
    # The same keep-alive connection still works after each error.
    assert call(server.port, "GET", "/healthz", conn=conn)[0] == 200
  conn.close()
  status, _ = call(server.port, "GET", "/v1/generate")
  assert status == 405
  assert server.store.counts() == {"responses": 1, "events": 0}


def test_the_feedback_page_is_served_as_package_data(serve):
  port = serve().port
  conn = http.client.HTTPConnection("127.0.0.1", port, timeout=15)
  conn.request("GET", "/?q=1")
  response = conn.getresponse()
  page = response.read().decode()
  assert response.status == 200
  assert response.getheader("Content-Type") == "text/html; charset=utf-8"
  assert response.getheader("Cache-Control") == "no-cache"
  for control in ("query", "ask", "answer", "source", "like", "dislike", "reask", "events"):
    assert f'id="{control}"' in page
  assert call(port, "GET", "/healthz", conn=conn)[0] == 200  # keep-alive after the page
  conn.close()


def test_wrong_method_names_the_allowed_one_and_length_is_required(serve):
  port = serve().port
  conn = http.client.HTTPConnection("127.0.0.1", port, timeout=15)
  conn.request("DELETE", "/v1/feedback")
  response = conn.getresponse()
  assert (response.status, response.getheader("Allow")) == (405, "POST")
  response.read()
  conn.putrequest("POST", "/v1/generate")  # no Content-Length header
  conn.endheaders()
  response = conn.getresponse()
  assert response.status == 411 and "error" in json.loads(response.read())
  conn.close()


class SlowPolicy:
  """Records batch sizes; optionally fails or stalls."""

  model_step = 0

  def __init__(self, delay=0.02, fail=False):
    self.delay, self.fail, self.batch_sizes = delay, fail, []

  def generate(self, queries, behaviors):
    time.sleep(self.delay)
    if self.fail:
      raise RuntimeError("boom")
    self.batch_sizes.append(len(queries))
    return [f"{b}: answer to {q}" for q, b in zip(queries, behaviors, strict=True)]

  def maybe_reload(self):
    return False


def _run_threads(n, target):
  barrier = threading.Barrier(n)
  results = [None] * n

  def run(k):
    barrier.wait()
    results[k] = target(k)

  threads = [threading.Thread(target=run, args=(k,)) for k in range(n)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  return results


def test_generation_is_batched(serve):
  policy = SlowPolicy()
  policy.default_behavior = "most liked"
  policy.context = lambda query: f"search result for {query}"
  server = serve(policy, batch_max_size=8, batch_timeout_ms=30)
  results = _run_threads(
    16, lambda k: call(server.port, "POST", "/v1/generate", {"query": f"q{k}"})
  )
  assert [r[1]["response"] for r in results] == [f"most liked: answer to q{k}" for k in range(16)]
  # Each answer says what its prompt held: the condition used and the query's search result.
  assert [(r[1]["behavior"], r[1]["context"]) for r in results] == [
    ("most liked", f"search result for q{k}") for k in range(16)
  ]
  assert sum(policy.batch_sizes) == 16 and len(policy.batch_sizes) < 16
  assert max(policy.batch_sizes) <= 8
  feed, _ = server.store.read_new()
  assert {r.behavior for r in feed.responses} == {"most liked"}  # the condition actually used


def test_policy_failure_and_timeout_are_reported_and_the_server_stays_healthy(serve):
  failing = serve(SlowPolicy(fail=True))
  status, out = call(failing.port, "POST", "/v1/generate", {"query": "q"})
  assert status == 500 and "boom" in out["error"]
  assert call(failing.port, "GET", "/healthz")[0] == 200
  slow = serve(SlowPolicy(delay=0.5), generate_timeout_seconds=0.05)
  assert call(slow.port, "POST", "/v1/generate", {"query": "q"})[0] == 503
  assert call(slow.port, "GET", "/healthz")[0] == 200


class ReloadingPolicy:
  """Every reload poll brings a "newer checkpoint"; a swap inside a batch would be caught."""

  def __init__(self):
    self.model_step = 0

  def generate(self, queries, behaviors):
    step = self.model_step
    time.sleep(0.003)
    if self.model_step != step:
      raise AssertionError("weights changed in the middle of a batch")
    return [f"answer to {q} @{step}" for q in queries]

  def maybe_reload(self):
    self.model_step += 1
    return True


def test_hot_reload_swaps_between_batches_without_dropping_requests(serve):
  server = serve(ReloadingPolicy(), reload_poll_seconds=0.005, batch_max_size=4)

  def work(k):
    return [call(server.port, "POST", "/v1/generate", {"query": f"q{k}-{i}"}) for i in range(25)]

  answers = [a for thread in _run_threads(8, work) for a in thread]
  assert all(status == 200 for status, _ in answers)
  feed, _ = server.store.read_new()
  stored_step = {r.id: r.model_step for r in feed.responses}
  steps = {int(out["response"].rsplit("@", 1)[1]) for _, out in answers}
  for _, out in answers:  # the step a response was stored with is the step that generated it
    assert out["response"].endswith(f"@{stored_step[out['id']]}")
  assert len(steps) > 1 and len(stored_step) == 200
  assert call(server.port, "GET", "/v1/stats")[1]["model_step"] >= max(steps)


def test_concurrent_mixed_load(serve, store_url):
  """8 threads x 200 requests: generate, feedback, duplicates, races on one event id, bad input."""
  server = serve(batch_max_size=8, store_url=store_url)
  port = server.port
  _, seed = call(port, "POST", "/v1/generate", {"query": "seed"})
  lock = threading.Lock()
  acked_ids = [seed["id"]]  # responses any thread may send feedback for
  accepted = {}  # event_id -> (response id, type) of the answer that said duplicate=False
  new_answers = collections.Counter()  # event_id -> how many answers said duplicate=False
  acked_events = []  # event ids answered 200, for the duplicate action
  bad = _bad_requests(seed["id"])

  def work(k):
    rng = random.Random(k)
    mismatches, generated = [], 0
    for i in range(200):
      action = rng.random()
      with lock:
        rid = rng.choice(acked_ids)
      if action < 0.25:
        status, out = call(port, "POST", "/v1/generate", {"query": f"q{k}-{i}"})
        if status != 200 or out["response"] != f"answer to q{k}-{i}":
          mismatches.append(("generate", status, out))
        generated += 1
        with lock:
          acked_ids.append(out["id"])
        continue
      if action < 0.55:  # a fresh event
        event_id, body = f"t{k}-{i}", {"id": rid, "type": rng.choice(["likes", "clicks"])}
      elif action < 0.65:  # all threads race on a few shared event ids
        event_id, body = f"shared-{i % 5}", {"id": seed["id"], "type": "impressions"}
      elif action < 0.75:  # a retry of an event already acknowledged
        with lock:
          if not acked_events:
            continue
          event_id = rng.choice(acked_events)
          body = {"id": accepted[event_id][0], "type": accepted[event_id][1]}
      else:
        name, method, path, body, expected = rng.choice(bad)
        status, out = call(port, method, path, body)
        if status != expected or "error" not in out:
          mismatches.append((name, status, out))
        continue
      status, out = call(port, "POST", "/v1/feedback", body | {"event_id": event_id})
      if status != 200:
        mismatches.append(("feedback", status, out))
        continue
      with lock:
        if not out["duplicate"]:
          new_answers[event_id] += 1
          accepted[event_id] = (body["id"], body["type"])
        acked_events.append(event_id)
    return mismatches, generated

  results = _run_threads(8, work)
  assert [m for ms, _ in results for m in ms] == []
  assert set(new_answers.values()) == {1}  # each event id was "new" exactly once
  feed, _ = server.store.read_new()
  stored = collections.Counter(e.event_id for e in feed.events)
  assert set(stored.values()) == {1} and set(stored) == set(accepted)
  assert {e.event_id: (e.response_id, e.type) for e in feed.events} == accepted
  assert len(feed.responses) == 1 + sum(g for _, g in results)
  assert call(port, "GET", "/healthz")[0] == 200
  stats = call(port, "GET", "/v1/stats")[1]
  assert stats == {
    "responses": len(feed.responses),
    "feedback_events": len(accepted),
    "model_step": 0,
  }


# -- the real process: SIGKILL mid-load, restart, nothing acknowledged is lost ---------------------


def _start_process(tmp_path, workdir, store_url=""):
  command = [
    *(sys.executable, "-m", "rlhb_jax.main", f"--config={os.path.join(REPO, 'configs/base.py')}"),
    *(f"--workdir={workdir}", "--config.mode=serve", "--config.serve.policy=echo"),
    *("--config.serve.port=0", f"--config.serve.max_body_bytes={MAX_BODY}"),
    f"--config.serve.store_url={store_url}",
  ]
  with open(tmp_path / "server.log", "a") as log:
    proc = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=log, text=True)
  ready, _, _ = select.select([proc.stdout], [], [], 30)
  line = proc.stdout.readline() if ready else ""
  if "listening on" not in line:
    proc.kill()
    raise AssertionError(f"server did not start: {line!r}\n{(tmp_path / 'server.log').read_text()}")
  return proc, int(line.rsplit(":", 1)[1])


def _save_checkpoint(path, state):
  """What the trainer does: the cursor goes to disk atomically with what it consumed."""
  tmp = f"{path}.tmp"
  with open(tmp, "w") as f:
    json.dump(state, f)
  os.replace(tmp, path)


def test_sigkill_mid_load_loses_no_acknowledged_event(tmp_path, store_url):
  workdir = tmp_path / "run"
  proc, port = _start_process(tmp_path, workdir, store_url)
  acked, lock, stop = [], threading.Lock(), threading.Event()

  def load(k):
    for i in range(10_000):
      try:
        status, out = call(port, "POST", "/v1/generate", {"query": f"q{k}-{i}"})
        for j in range(2):
          event = {"id": out["id"], "event_id": f"k{k}-{i}-{j}", "type": "likes"}
          status, _ = call(port, "POST", "/v1/feedback", event)
          if status == 200:
            with lock:
              acked.append(event["event_id"])
      except (OSError, http.client.HTTPException):
        return  # the server is gone

  # The trainer reads alongside, checkpointing cursor and consumed ids after each read.
  checkpoint = tmp_path / "trainer.json"
  _save_checkpoint(checkpoint, {"cursor": start_cursor(), "consumed": []})

  def consume():
    with open_store(store_url) as store:
      while not stop.is_set():
        state = json.loads(checkpoint.read_text())
        feed, cursor = store.read_new(state["cursor"], limit=25)
        consumed = state["consumed"] + [e.event_id for e in feed.events]
        _save_checkpoint(checkpoint, {"cursor": cursor, "consumed": consumed})
        time.sleep(0.005)
      store.read_new(json.loads(checkpoint.read_text())["cursor"])  # read, then "crash" unsaved

  threads = [threading.Thread(target=load, args=(k,)) for k in range(8)]
  threads.append(threading.Thread(target=consume))
  for t in threads:
    t.start()
  deadline = time.monotonic() + 20
  while len(acked) < 300 and time.monotonic() < deadline:
    time.sleep(0.01)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  stop.set()
  for t in threads:
    t.join()
  assert len(acked) >= 300

  proc, port = _start_process(tmp_path, workdir, store_url)
  try:
    stats = call(port, "GET", "/v1/stats")[1]
    assert stats["feedback_events"] >= len(acked)
    with open_store(store_url) as store:
      feed, _ = store.read_new()
      stored = [e.event_id for e in feed.events]
      assert set(acked) <= set(stored) and len(stored) == len(set(stored))
      # Idempotence survives the restart; new events still land.
      retry = {"id": feed.events[0].response_id, "event_id": acked[0], "type": "likes"}
      assert call(port, "POST", "/v1/feedback", retry) == (200, {"duplicate": True})
      fresh = retry | {"event_id": "after-restart"}
      assert call(port, "POST", "/v1/feedback", fresh) == (200, {"duplicate": False})
      # The restarted trainer resumes from its checkpoint and consumes each event exactly once.
      state = json.loads(checkpoint.read_text())
      assert state["consumed"]
      feed, _ = store.read_new(state["cursor"])
      consumed = state["consumed"] + [e.event_id for e in feed.events]
      assert consumed == [*stored, "after-restart"]
    assert call(port, "POST", "/v1/generate", {"query": "q" * MAX_BODY})[0] == 413  # config used
    assert call(port, "GET", "/healthz")[0] == 200
  finally:
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=15) == 0


# -- the framework's extras: the published schema, singular event types, the OpenAI endpoint -------


def test_keep_alive_answers_do_not_wait_for_delayed_acks(serve):
  """Without TCP_NODELAY every answer waited ~40 ms (Nagle's algorithm vs. delayed ACK)."""
  port = serve().port
  conn = http.client.HTTPConnection("127.0.0.1", port, timeout=15)
  took = []
  for _ in range(21):
    start = time.perf_counter()
    assert call(port, "GET", "/healthz", conn=conn)[0] == 200
    took.append(time.perf_counter() - start)
  conn.close()
  assert sorted(took)[10] < 0.02, took


def test_openapi_schema_is_published(serve):
  status, schema = call(serve().port, "GET", "/openapi.json")
  assert status == 200 and schema["openapi"].startswith("3.")
  paths = schema["paths"]
  for path in ("/v1/generate", "/v1/feedback", "/v1/chat/completions"):
    assert set(paths[path]) == {"post"}
    assert {"200", "400", "413", "422"} <= set(paths[path]["post"]["responses"])
  assert set(paths["/v1/stats"]) == {"get"}
  required = schema["components"]["schemas"]["FeedbackRequest"]["required"]
  assert sorted(required) == ["event_id", "id", "type"]


def test_singular_event_types_are_stored_as_the_configured_plural(serve):
  server = serve()
  _, out = call(server.port, "POST", "/v1/generate", {"query": "q"})
  singular = ["like", "click", "dislike", "copy", "share", "dwell", "impression", "requery"]
  for i, kind in enumerate(singular):
    event = {"id": out["id"], "event_id": f"e{i}", "type": kind}
    assert call(server.port, "POST", "/v1/feedback", event) == (200, {"duplicate": False})
  event = {"id": out["id"], "event_id": "e-bad", "type": "hug"}
  assert call(server.port, "POST", "/v1/feedback", event)[0] == 422
  feed, _ = server.store.read_new()
  assert [e.type for e in feed.events] == [
    "likes",
    "clicks",
    "dislikes",
    "copies",
    "shares",
    "dwell_seconds",
    "impressions",
    "requeries",
  ]


def test_openai_client_gets_a_chat_completion_whose_id_takes_feedback(serve):
  openai = pytest.importorskip("openai")
  policy = SlowPolicy(delay=0)
  policy.default_behavior = "most liked"
  server = serve(policy)
  client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
  messages = [
    {"role": "system", "content": "be brief"},
    {"role": "user", "content": "capital of Peru?"},
  ]
  completion = client.chat.completions.create(
    model="rlhb", messages=messages, max_tokens=32, temperature=0.7, n=1
  )
  (choice,) = completion.choices
  assert choice.message.content == "most liked: answer to capital of Peru?"
  assert (choice.message.role, choice.finish_reason) == ("assistant", "stop")
  event = {"id": completion.id, "event_id": "e1", "type": "like"}
  assert call(server.port, "POST", "/v1/feedback", event) == (200, {"duplicate": False})
  # The behavior condition is an extra field; the stored response carries it.
  other = client.chat.completions.create(
    model="rlhb", messages=messages, extra_body={"behavior": "many disliked it"}
  )
  assert other.choices[0].message.content == "many disliked it: answer to capital of Peru?"
  # Streaming: the answer as server-sent chunks with the same kind of id.
  chunks = list(client.chat.completions.create(model="rlhb", messages=messages, stream=True))
  text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
  assert text == "most liked: answer to capital of Peru?"
  streamed = {"id": chunks[0].id, "event_id": "e2", "type": "clicks"}
  assert call(server.port, "POST", "/v1/feedback", streamed) == (200, {"duplicate": False})
  feed, _ = server.store.read_new()
  assert [(r.id, r.behavior) for r in feed.responses] == [
    (completion.id, "most liked"),
    (other.id, "many disliked it"),
    (chunks[0].id, "most liked"),
  ]
  assert [(e.response_id, e.type) for e in feed.events] == [
    (completion.id, "likes"),
    (chunks[0].id, "clicks"),
  ]
  with pytest.raises(openai.UnprocessableEntityError):
    client.chat.completions.create(model="rlhb", messages=messages, n=2)
  with pytest.raises(openai.UnprocessableEntityError):
    client.chat.completions.create(model="rlhb", messages=[{"role": "system", "content": "x"}])
