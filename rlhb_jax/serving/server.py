"""HTTP JSON server: generation with request batching, behavior feedback, hot reload.

Standard library only (`http.server` + `json`), so it runs, and is tested, without JAX. The model
sits behind the `Policy` protocol; the endpoints and their error statuses are in docs/SERVING.md.
`GET /` is the feedback page (`static/index.html`), where a person asks and reacts to the answers.

Threads: one per connection (ThreadingHTTPServer); one batcher that gathers up to `batch_max_size`
generation requests (or waits `batch_timeout_ms` after the first) and calls the policy once; one
watcher that calls `policy.maybe_reload()` every `reload_poll_seconds`. Batches and reloads take the
same lock, so new weights are swapped in between batches and no queued request is dropped.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import json
import logging
import math
import os
import queue
import signal
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Protocol, runtime_checkable

from rlhb_jax.serving.config import ServeConfig
from rlhb_jax.serving.store import FeedbackStore, UnknownResponseError, open_store

log = logging.getLogger(__name__)

# A body this much over the limit is still read and thrown away so the client sees the 413 (closing
# a socket with unread data resets it); beyond that the connection is just closed.
_DRAIN_SLACK_BYTES = 1 << 16


@runtime_checkable
class Policy(Protocol):
  """What the server needs from a model.

  `generate` is called from one thread at a time, never concurrently with `maybe_reload`. An
  optional attribute `default_behavior: str` is used for requests without a behavior (the most
  preferred behavior text); without it such requests reach `generate` as None. An optional method
  `context(query) -> str` names the search result the prompt of `query` carries ("" for none); the
  server returns it with the answer, so a client shows what the model was conditioned on.
  """

  model_step: int

  def generate(self, queries: list[str], behaviors: list[str | None]) -> list[str]:
    """One response per query, generated under the matching behavior condition."""
    ...

  def maybe_reload(self) -> bool:
    """Loads a newer checkpoint if there is one; True if the weights changed."""
    ...


class EchoPolicy:
  """Deterministic stand-in for tests and smoke runs: answers "answer to {query}"."""

  model_step = 0

  def generate(self, queries: list[str], behaviors: list[str | None]) -> list[str]:
    return [f"answer to {q}" for q in queries]

  def maybe_reload(self) -> bool:
    return False


class HTTPError(Exception):
  """An error answered as `{"error": message}` with `status`."""

  def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
    super().__init__(message)
    self.status = status
    self.message = message
    self.headers = headers or {}


@dataclasses.dataclass
class _Pending:
  """A generation request waiting for its batch."""

  query: str
  behavior: str | None
  done: threading.Event = dataclasses.field(default_factory=threading.Event)
  result: dict[str, Any] | None = None  # the JSON answer of /v1/generate
  error: str | None = None


class _Batcher:
  """Gathers generation requests into batches and runs them through the policy."""

  def __init__(
    self, config: ServeConfig, store: FeedbackStore, policy: Policy, lock: threading.Lock
  ):
    self._config = config
    self._store = store
    self._policy = policy
    self._policy_lock = lock
    self._queue: queue.Queue[_Pending] = queue.Queue()
    self._stopping = threading.Event()
    self.thread = threading.Thread(target=self._loop, name="rlhb-batcher", daemon=True)

  def submit(self, query: str, behavior: str | None) -> dict[str, Any]:
    """Blocks until the request's batch ran; returns the answer (id, response, condition)."""
    if self._stopping.is_set():
      raise HTTPError(503, "server is shutting down")
    pending = _Pending(query, behavior)
    self._queue.put(pending)
    if self._stopping.is_set():  # stop() may have drained the queue just before the put
      self._fail_queued()
    if not pending.done.wait(self._config.generate_timeout_seconds):
      raise HTTPError(503, "generation timed out")
    if pending.error is not None:
      raise HTTPError(503 if self._stopping.is_set() else 500, pending.error)
    assert pending.result is not None
    return pending.result

  def _collect(self) -> list[_Pending]:
    try:
      batch = [self._queue.get(timeout=0.1)]
    except queue.Empty:
      return []
    deadline = time.monotonic() + self._config.batch_timeout_ms / 1000.0
    while len(batch) < self._config.batch_max_size:
      try:
        batch.append(self._queue.get(timeout=max(0.0, deadline - time.monotonic())))
      except queue.Empty:
        break
    return batch

  def _run(self, batch: list[_Pending]) -> None:
    try:
      with self._policy_lock:
        default = getattr(self._policy, "default_behavior", None)
        behaviors = [p.behavior if p.behavior is not None else default for p in batch]
        responses = self._policy.generate([p.query for p in batch], behaviors)
        model_step = int(self._policy.model_step)
        context = getattr(self._policy, "context", lambda query: "")
        contexts = [context(p.query) for p in batch]
      if len(responses) != len(batch):
        raise RuntimeError(f"policy returned {len(responses)} responses for {len(batch)} queries")
      ids = self._store.add_responses([p.query for p in batch], behaviors, responses, model_step)
    except Exception as e:
      log.exception("generation batch of %d failed", len(batch))
      for p in batch:
        p.error = f"generation failed: {type(e).__name__}: {e}"
        p.done.set()
      return
    for p, rid, response, behavior, ctx in zip(
      batch, ids, responses, behaviors, contexts, strict=True
    ):
      p.result = {
        "id": rid,
        "response": response,
        "model_step": model_step,
        "behavior": behavior,
        "context": ctx,
      }
      p.done.set()

  def _loop(self) -> None:
    while not self._stopping.is_set():
      batch = self._collect()
      if batch:
        self._run(batch)
    self._fail_queued()

  def _fail_queued(self) -> None:
    while True:
      try:
        pending = self._queue.get_nowait()
      except queue.Empty:
        return
      pending.error = "server is shutting down"
      pending.done.set()

  def stop(self) -> None:
    self._stopping.set()
    if self.thread.is_alive():
      self.thread.join()
    self._fail_queued()


def _require_object(body: Any) -> dict[str, Any]:
  if not isinstance(body, dict):
    raise HTTPError(422, f"body must be a JSON object, got {type(body).__name__}")
  return body


def _require_str(body: dict[str, Any], field: str, optional: bool = False) -> str | None:
  value = body.get(field)
  if value is None and optional:
    return None
  if value is None:
    raise HTTPError(422, f"missing field {field!r}")
  if not isinstance(value, str):
    raise HTTPError(422, f"field {field!r} must be a string, got {type(value).__name__}")
  if not value.strip():
    raise HTTPError(422, f"field {field!r} must not be empty")
  return value


class FeedbackServer:
  """The serving process: HTTP front end, batcher, reload watcher and feedback store."""

  def __init__(self, config: ServeConfig, store: FeedbackStore, policy: Policy, own_store: bool):
    self.config = config
    self.store = store
    self.policy = policy
    self._own_store = own_store
    self.page = importlib.resources.files(__package__).joinpath("static/index.html").read_bytes()
    self._policy_lock = threading.Lock()
    self._batcher = _Batcher(config, store, policy, self._policy_lock)
    self._stopping = threading.Event()
    self._watcher = threading.Thread(target=self._watch, name="rlhb-reload", daemon=True)
    self._httpd = _HTTPServer((config.host, config.port), _Handler)
    self._httpd.app = self
    self._http_thread = threading.Thread(
      target=self._httpd.serve_forever, kwargs={"poll_interval": 0.1}, name="rlhb-http", daemon=True
    )
    self._shut = False

  @property
  def port(self) -> int:
    return self._httpd.server_address[1]

  @property
  def url(self) -> str:
    return f"http://{self.config.host}:{self.port}"

  def start(self) -> FeedbackServer:
    """Serves in background threads; returns at once."""
    self._batcher.thread.start()
    self._watcher.start()
    self._http_thread.start()
    log.info("serving on %s (store %s)", self.url, self.store.where)
    return self

  def shutdown(self) -> None:
    """Stops accepting, fails what is still queued with 503, closes the store if it owns it."""
    if self._shut:
      return
    self._shut = True
    self._stopping.set()
    if self._http_thread.is_alive():
      self._httpd.shutdown()
    self._httpd.server_close()
    self._batcher.stop()
    if self._watcher.is_alive():
      self._watcher.join()
    if self._own_store:
      self.store.close()

  def _watch(self) -> None:
    while not self._stopping.wait(self.config.reload_poll_seconds):
      try:
        with self._policy_lock:
          if self.policy.maybe_reload():
            log.info("policy reloaded: model_step=%d", self.policy.model_step)
      except Exception:
        log.exception("policy reload failed; keeping the current weights")

  # -- endpoints: each takes the parsed body (or None) and returns the JSON payload ---------------

  def generate(self, body: Any) -> dict[str, Any]:
    body = _require_object(body)
    query = _require_str(body, "query")
    behavior = _require_str(body, "behavior", optional=True)
    return self._batcher.submit(query, behavior)

  def feedback(self, body: Any) -> dict[str, Any]:
    body = _require_object(body)
    rid = _require_str(body, "id")
    event_id = _require_str(body, "event_id")
    kind = _require_str(body, "type")
    if kind not in self.config.feedback_types:
      raise HTTPError(
        422, f"field 'type': {kind!r} is not one of {list(self.config.feedback_types)}"
      )
    value = body.get("value", 1)
    if value is None:
      value = 1
    if isinstance(value, bool) or not isinstance(value, int | float):
      raise HTTPError(422, f"field 'value' must be a number, got {type(value).__name__}")
    if not math.isfinite(value) or value < 0:
      raise HTTPError(422, f"field 'value' must be finite and >= 0, got {value!r}")
    try:
      new = self.store.add_event(rid, event_id, kind, float(value))
    except UnknownResponseError:
      raise HTTPError(404, f"unknown response id {rid!r}") from None
    return {"duplicate": not new}

  def stats(self, body: Any) -> dict[str, Any]:
    counts = self.store.counts()
    return {
      "responses": counts["responses"],
      "feedback_events": counts["events"],
      "model_step": int(self.policy.model_step),
    }

  def index(self, body: Any) -> bytes:
    return self.page

  def health(self, body: Any) -> dict[str, Any]:
    if not self._batcher.thread.is_alive():
      raise HTTPError(503, "batcher thread is not running")
    return {"status": "ok", "model_step": int(self.policy.model_step)}


# path -> (method, FeedbackServer method name); a method returning bytes answers with the page.
_ROUTES = {
  "/": ("GET", "index"),
  "/v1/generate": ("POST", "generate"),
  "/v1/feedback": ("POST", "feedback"),
  "/v1/stats": ("GET", "stats"),
  "/healthz": ("GET", "health"),
}


# The page's script and style are inline and it talks to this server only.
_PAGE_HEADERS = {
  "Cache-Control": "no-cache",
  "X-Content-Type-Options": "nosniff",
  "Content-Security-Policy": (
    "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
    "connect-src 'self'; frame-ancestors 'none'"
  ),
}


class _HTTPServer(ThreadingHTTPServer):
  daemon_threads = True
  request_queue_size = 128  # listen backlog; the default 5 drops bursts of new connections
  app: FeedbackServer


class _Handler(BaseHTTPRequestHandler):
  protocol_version = "HTTP/1.1"  # keep-alive; every answer carries Content-Length
  timeout = 30  # seconds a silent client may hold its thread
  disable_nagle_algorithm = True  # headers and body go out as two writes: don't wait for an ACK
  server: _HTTPServer

  def do_GET(self) -> None:
    self._dispatch("GET")

  def do_POST(self) -> None:
    self._dispatch("POST")

  def do_PUT(self) -> None:
    self._dispatch("PUT")

  def do_DELETE(self) -> None:
    self._dispatch("DELETE")

  def do_PATCH(self) -> None:
    self._dispatch("PATCH")

  def log_message(self, format: str, *args: Any) -> None:
    log.debug("%s %s", self.address_string(), format % args)

  def _dispatch(self, method: str) -> None:
    self._body_read = False
    try:
      payload = self._route(method)
      if isinstance(payload, bytes):
        self._send(200, payload, "text/html; charset=utf-8", _PAGE_HEADERS)
      else:
        self._answer(200, payload)
    except HTTPError as e:
      self._answer(e.status, {"error": e.message}, e.headers)
    except Exception as e:
      log.exception("%s %s failed", method, self.path)
      self._answer(500, {"error": f"internal error: {type(e).__name__}"})

  def _route(self, method: str) -> dict[str, Any] | bytes:
    path = urllib.parse.urlsplit(self.path).path
    if path not in _ROUTES:
      raise HTTPError(404, f"no such path {path!r}")
    allowed, endpoint = _ROUTES[path]
    if method != allowed:
      raise HTTPError(405, f"{path} accepts {allowed} only", {"Allow": allowed})
    body = self._read_json() if method == "POST" else None
    return getattr(self.server.app, endpoint)(body)

  def _content_length(self) -> int:
    if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
      raise HTTPError(411, "chunked bodies are not accepted; send Content-Length")
    raw = self.headers.get("Content-Length")
    if raw is None:
      raise HTTPError(411, "Content-Length required")
    try:
      length = int(raw)
    except ValueError:
      raise HTTPError(400, f"bad Content-Length {raw!r}") from None
    if length < 0:
      raise HTTPError(400, f"bad Content-Length {raw!r}")
    return length

  def _read_json(self) -> Any:
    length = self._content_length()
    limit = self.server.app.config.max_body_bytes
    if length > limit:
      raise HTTPError(413, f"body of {length} bytes is over the limit of {limit}")
    raw = self.rfile.read(length)
    self._body_read = True
    if len(raw) != length:
      raise HTTPError(400, "body shorter than Content-Length")
    try:
      return json.loads(raw)
    except (ValueError, RecursionError) as e:
      raise HTTPError(400, f"malformed JSON: {e}") from None

  def _discard_body(self) -> None:
    """Keeps the connection usable after an early error, or closes it if the body is too big."""
    if self._body_read or self.headers.get("Content-Length") is None:
      if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
        self.close_connection = True
      return
    try:
      left = int(self.headers["Content-Length"])
    except ValueError:
      self.close_connection = True
      return
    if left > self.server.app.config.max_body_bytes + _DRAIN_SLACK_BYTES:
      self.close_connection = True
      return
    while left > 0:
      chunk = self.rfile.read(min(left, 1 << 16))
      if not chunk:
        break
      left -= len(chunk)
    self._body_read = True

  def _answer(
    self, status: int, payload: dict[str, Any], headers: dict[str, str] | None = None
  ) -> None:
    self._send(status, json.dumps(payload).encode(), "application/json", headers)

  def _send(
    self, status: int, data: bytes, content_type: str, headers: dict[str, str] | None = None
  ) -> None:
    self._discard_body()
    self.send_response(status)
    self.send_header("Content-Type", content_type)
    self.send_header("Content-Length", str(len(data)))
    for key, value in (headers or {}).items():
      self.send_header(key, value)
    if self.close_connection:
      self.send_header("Connection", "close")
    self.end_headers()
    self.wfile.write(data)


def make_server(
  config: ServeConfig,
  workdir: str | os.PathLike,
  policy: Policy,
  store: FeedbackStore | None = None,
) -> FeedbackServer:
  """Builds (does not start) a server for `policy`.

  Binds the port at once, so `.port` is known (useful with `port=0`). Without `store`, opens the one
  `config.store_url` names (default `workdir/feedback.db`) and closes it on `shutdown()`.
  """
  if store is not None:
    return FeedbackServer(config, store, policy, own_store=False)
  store = open_store(config.store_url, workdir, config.sqlite_synchronous)
  try:
    return FeedbackServer(config, store, policy, own_store=True)
  except BaseException:
    store.close()  # e.g. the port is taken
    raise


def run_server(config: ServeConfig, workdir: str | os.PathLike, policy: Policy) -> None:
  """Serves in the foreground until SIGINT or SIGTERM; prints the address once listening."""
  server = make_server(config, workdir, policy)
  stop = threading.Event()
  for sig in (signal.SIGINT, signal.SIGTERM):
    signal.signal(sig, lambda *_: stop.set())
  server.start()
  print(f"rlhb_jax.serve: listening on {server.url}", flush=True)
  try:
    while not stop.wait(0.5):  # a timed wait lets the signal handlers run promptly
      pass
  finally:
    server.shutdown()
