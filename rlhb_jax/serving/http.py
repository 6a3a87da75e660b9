"""The HTTP layer: a FastAPI (Starlette) app served by uvicorn, over a `FeedbackService`.

FastAPI rather than bare Starlette: the request and answer schemas are pydantic models, which both
validate bodies (strict types: `"1"` is not a number, `true` is not a value) and publish the API at
`/openapi.json` for client generators, with no second copy of the schema to keep in step. Starlette
underneath does routing, 404/405 (with `Allow`) and keep-alive; uvicorn does HTTP/1.1 parsing.

What the framework does not do the way docs/SERVING.md documents is adapted here: every error is
`{"error": str}`; malformed JSON is 400 (FastAPI says 422); a body over `max_body_bytes` is 413
before it is read, a POST without `Content-Length` 411 (`_BodyLimit`). Who is asking (the
`Authorization` header, the session cookie, the client address) is read here and judged by the
service's `Gate` (auth.py), before any body is parsed (`_Admission`): the routes that generate or
record take the `Caller` it admits.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import threading
import time
from typing import Any

import fastapi
import uvicorn
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from rlhb_jax.serving.auth import SESSION_COOKIE, Caller, Gate
from rlhb_jax.serving.config import ServeConfig
from rlhb_jax.serving.schemas import (
  ChatCompletion,
  ChatCompletionRequest,
  ErrorAnswer,
  FeedbackAnswer,
  FeedbackRequest,
  GenerateAnswer,
  GenerateRequest,
  Health,
  ShownAnswer,
  Stats,
  chat_completion,
  query_of,
  sse,
  storable,
)
from rlhb_jax.serving.service import FeedbackService, Policy, ServiceError
from rlhb_jax.serving.store import FeedbackStore, open_store

log = logging.getLogger(__name__)


class _BodyLimit:
  """ASGI middleware: 411 for a POST without Content-Length, 413 over the limit, both unread.

  Every POST body is read as JSON whatever its Content-Type says (as `curl -d` sends a form type).
  """

  def __init__(self, app: Any, limit: int) -> None:
    self.app = app
    self.limit = limit

  async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
    if scope["type"] == "http" and scope["method"] == "POST":
      headers = dict(scope["headers"])
      raw = headers.get(b"content-length")
      if raw is None or b"chunked" in headers.get(b"transfer-encoding", b"").lower():
        message = "Content-Length required (chunked bodies are not accepted)"
        return await _send_error(send, 411, message)
      try:
        length = int(raw)
      except ValueError:
        length = -1
      if length < 0:
        return await _send_error(send, 400, f"bad Content-Length {raw.decode('latin-1')!r}")
      if length > self.limit:
        message = f"body of {length} bytes is over the limit of {self.limit}"
        return await _send_error(send, 413, message)
      headers[b"content-type"] = b"application/json"
      scope = scope | {"headers": list(headers.items())}
    await self.app(scope, receive, send)


class _Admission:
  """ASGI middleware: the `Gate` admits the caller of a generation or feedback route (401, 429)
  before the route reads the body, so an unknown client costs no JSON parsing and a malformed
  body from it is refused as any other request of its; the route reads `request.state.caller`."""

  ROUTES = (("POST", "/v1/generate"), ("POST", "/v1/feedback"), ("POST", "/v1/chat/completions"))

  def __init__(self, app: Any, gate: Gate) -> None:
    self.app = app
    self.gate = gate

  def _admitted(self, scope: dict) -> bool:
    method, path = scope["method"], scope["path"]
    if method == "GET" and path.startswith("/v1/responses/"):
      return True
    return (method, path) in self.ROUTES

  async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
    if scope["type"] == "http" and self._admitted(scope):
      request = fastapi.Request(scope)
      try:
        caller = await run_in_threadpool(
          self.gate.admit,
          _address(request),
          request.headers.get("authorization"),
          request.cookies.get(SESSION_COOKIE),
        )
      except ServiceError as e:
        return await _send_error(send, e.status, e.message, e.headers)
      except Exception as e:  # e.g. the store is unreachable: as the routes' errors are answered
        log.exception("%s %s: admitting the caller failed", scope["method"], scope["path"])
        return await _send_error(send, 500, f"internal error: {type(e).__name__}")
      scope.setdefault("state", {})["caller"] = caller
    await self.app(scope, receive, send)


async def _send_error(
  send: Any, status: int, message: str, extra: dict[str, str] | None = None
) -> None:
  body = json.dumps({"error": message}).encode()
  headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
  headers += [(k.lower().encode(), v.encode()) for k, v in (extra or {}).items()]
  await send({"type": "http.response.start", "status": status, "headers": headers})
  await send({"type": "http.response.body", "body": body})


def _validation_message(errors: list[dict[str, Any]]) -> tuple[int, str]:
  for error in errors:
    if error["type"] == "json_invalid":
      return 400, f"malformed JSON: {error.get('ctx', {}).get('error', error['msg'])}"
  parts = []
  for error in errors:
    loc = [str(p) for p in error["loc"] if p != "body"]
    where = f"field {'.'.join(loc)!r}" if loc else "body"
    parts.append(f"{where}: {error['msg']}")
  return 422, "; ".join(parts)


# The page's script and style are inline and it talks to this server only.
_PAGE_HEADERS = {
  "Cache-Control": "no-cache",
  "X-Content-Type-Options": "nosniff",
  "Content-Security-Policy": (
    "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
    "connect-src 'self'; frame-ancestors 'none'"
  ),
}
_ERRORS = {
  code: {"model": ErrorAnswer} for code in (400, 401, 403, 404, 411, 413, 422, 429, 500, 503)
}


def _address(request: fastapi.Request) -> str:
  return request.client.host if request.client else ""


def build_app(service: FeedbackService) -> fastapi.FastAPI:
  """The ASGI app of `service`: routes, schemas, error shapes and the body limit."""
  app = fastapi.FastAPI(
    title="rlhb_jax feedback server",
    summary="Answers queries with the current policy and records the behaviors users report.",
    version="1",
    responses=_ERRORS,
  )

  @app.exception_handler(StarletteHTTPException)
  async def http_error(request: fastapi.Request, e: StarletteHTTPException) -> JSONResponse:
    message = str(e.detail)
    if e.status_code == 404 and e.detail == "Not Found":
      message = f"no such path {request.url.path!r}"
    elif e.status_code == 405:
      message = f"{request.url.path} accepts {e.headers.get('Allow', '?')} only"
    return JSONResponse({"error": message}, e.status_code, headers=e.headers)

  @app.exception_handler(ServiceError)
  async def refused(request: fastapi.Request, e: ServiceError) -> JSONResponse:
    return JSONResponse({"error": e.message}, e.status, headers=e.headers)

  @app.exception_handler(RequestValidationError)
  async def invalid(request: fastapi.Request, e: RequestValidationError) -> JSONResponse:
    status, message = _validation_message(list(e.errors()))
    return JSONResponse({"error": message}, status)

  @app.exception_handler(Exception)
  async def internal(request: fastapi.Request, e: Exception) -> JSONResponse:
    log.exception("%s %s failed", request.method, request.url.path)
    return JSONResponse({"error": f"internal error: {type(e).__name__}"}, 500)

  gate = service.gate

  def admit(request: fastapi.Request) -> Caller:
    """The caller `_Admission` admitted (serve.auth, rate limits) before the body was read."""
    return request.state.caller

  def limit_address(request: fastapi.Request) -> None:
    gate.limit_address(_address(request))

  admitted = fastapi.Depends(admit)
  limited = [fastapi.Depends(limit_address)]

  @app.get("/", response_class=HTMLResponse, include_in_schema=False, dependencies=limited)
  def index(request: fastapi.Request) -> HTMLResponse:
    page = HTMLResponse(service.page, headers=_PAGE_HEADERS)
    session = gate.page_session(request.cookies.get(SESSION_COOKIE), _address(request))
    if session is not None:  # serve.auth=keys_or_session: the page's anonymous identity
      page.set_cookie(
        SESSION_COOKIE,
        session,
        max_age=int(service.config.session_max_age_seconds),
        httponly=True,
        samesite="strict",
        secure=service.config.cookie_secure,
      )
    return page

  @app.post("/v1/generate", response_model=GenerateAnswer)
  def generate(body: GenerateRequest, caller: Caller = admitted) -> dict[str, Any]:
    """Answers `query` under `behavior`; batched with concurrent requests."""
    return service.generate(body.query, body.behavior, caller)

  @app.get("/v1/responses/{rid}", response_model=ShownAnswer)
  def show(rid: str, caller: Caller = admitted) -> dict[str, Any]:
    """A stored response. An API key's read is recorded as an impression (it may then react to
    it); a session's is not: it reacts only to what this server generated for it."""
    if storable(rid) is not None:  # no such id was ever made; the database would refuse it
      raise ServiceError(404, "unknown response id")
    return service.show(rid, caller)

  @app.post("/v1/feedback", response_model=FeedbackAnswer)
  def feedback(body: FeedbackRequest, caller: Caller = admitted) -> dict[str, Any]:
    """Records one behavior event about a response the caller was shown, once per `event_id`."""
    value = 1.0 if body.value is None else body.value
    return service.feedback(body.id, body.event_id, body.type, value, caller)

  @app.post("/v1/chat/completions", response_model=ChatCompletion)
  def chat_completions(body: ChatCompletionRequest, caller: Caller = admitted) -> Any:
    """OpenAI-compatible: the answer's `id` is the response id `/v1/feedback` takes."""
    answer = service.generate(query_of(body.messages), body.behavior, caller)
    completion = chat_completion(answer, body.model)
    if body.stream:
      return StreamingResponse(sse(completion), media_type="text/event-stream")
    return completion

  @app.get("/v1/stats", response_model=Stats, dependencies=limited)
  def stats() -> dict[str, Any]:
    return service.stats()

  @app.get("/healthz", response_model=Health)
  def health() -> dict[str, Any]:
    return service.health()

  app.add_middleware(_Admission, gate=gate)
  app.add_middleware(_BodyLimit, limit=service.config.max_body_bytes)  # outermost: runs first
  return app


def _listen(host: str, port: int) -> socket.socket:
  """A listening TCP socket whose accepted connections get TCP_NODELAY.

  Made with proto=IPPROTO_TCP: asyncio sets TCP_NODELAY only on sockets that say so, and
  `socket.create_server` leaves proto 0; without it each answer (headers and body are two writes)
  waits ~40 ms for the client's delayed ACK.
  """
  family, kind, proto, _, address = socket.getaddrinfo(
    host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP
  )[0]
  sock = socket.socket(family, kind, proto)
  try:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.bind(address)
    sock.listen(128)  # backlog: the default drops bursts of new connections
  except BaseException:
    sock.close()
    raise
  return sock


class FeedbackServer:
  """A `FeedbackService` over HTTP: the listening socket and uvicorn in a background thread."""

  def __init__(self, service: FeedbackService):
    self.service = service
    self.config, self.store, self.policy = service.config, service.store, service.policy
    # Bound now, so `.port` is known before start() (port=0 picks a free one).
    self._socket = _listen(self.config.host, self.config.port)
    self._uvicorn = uvicorn.Server(
      uvicorn.Config(
        build_app(service),
        log_level="warning",
        access_log=False,
        lifespan="off",
        timeout_keep_alive=30,  # seconds an idle keep-alive connection is kept
        timeout_graceful_shutdown=5,
        # X-Forwarded-For names the client only when a trusted proxy sent it (serve.auth's rate
        # limits key on the client address).
        proxy_headers=bool(self.config.forwarded_allow_ips),
        forwarded_allow_ips=self.config.forwarded_allow_ips or None,
      )
    )
    self._http_thread = threading.Thread(
      target=self._uvicorn.run,  # its own event loop (uvloop where installed) in this thread
      kwargs={"sockets": [self._socket]},
      name="rlhb-http",
      daemon=True,
    )
    self._shut = False

  @property
  def port(self) -> int:
    return self._socket.getsockname()[1]

  @property
  def url(self) -> str:
    return f"http://{self.config.host}:{self.port}"

  def start(self) -> FeedbackServer:
    """Serves in background threads; returns once the HTTP server accepts connections."""
    self.service.start()
    self._http_thread.start()
    deadline = time.monotonic() + 30
    while not self._uvicorn.started and self._http_thread.is_alive():
      if time.monotonic() > deadline:
        raise RuntimeError("the HTTP server did not start within 30 s")
      time.sleep(0.005)
    if not self._uvicorn.started:
      raise RuntimeError("the HTTP server failed to start (see the log)")
    log.info("serving on %s (store %s)", self.url, self.store.where)
    return self

  def shutdown(self) -> None:
    """Stops accepting, lets requests in flight finish (queued ones get 503), closes the store."""
    if self._shut:
      return
    self._shut = True
    if self._http_thread.is_alive():
      self._uvicorn.should_exit = True
      self._http_thread.join()
    self._socket.close()
    self.service.stop()


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
    return FeedbackServer(FeedbackService(config, store, policy, own_store=False))
  store = open_store(config.store_url, workdir, config.sqlite_synchronous)
  try:
    return FeedbackServer(FeedbackService(config, store, policy, own_store=True))
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
  print(f"rlhb_jax serve: listening on {server.url}", flush=True)
  try:
    while not stop.wait(0.5):  # a timed wait lets the signal handlers run promptly
      pass
  finally:
    server.shutdown()
