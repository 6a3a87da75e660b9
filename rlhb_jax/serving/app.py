"""The HTTP layer: a FastAPI (Starlette) app served by uvicorn, over a `FeedbackServer`.

FastAPI rather than bare Starlette: the request and answer schemas are pydantic models, which both
validate bodies (strict types: `"1"` is not a number, `true` is not a value) and publish the API at
`/openapi.json` for client generators, with no second copy of the schema to keep in step. Starlette
underneath does routing, 404/405 (with `Allow`) and keep-alive; uvicorn does HTTP/1.1 parsing.

What the framework does not do the way docs/SERVING.md documents is adapted here: every error is
`{"error": str}`; malformed JSON is 400 (FastAPI says 422); a body over `max_body_bytes` is 413
before it is read, a POST without `Content-Length` 411 (`_BodyLimit`).
"""

from __future__ import annotations

import json
import logging
import time
from typing import TYPE_CHECKING, Annotated, Any, Literal

import fastapi
import pydantic
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

if TYPE_CHECKING:
  from rlhb_jax.serving.server import FeedbackServer

log = logging.getLogger(__name__)


def _not_blank(value: str) -> str:
  if not value.strip():
    raise ValueError("must not be empty")
  return value


Text = Annotated[pydantic.StrictStr, pydantic.AfterValidator(_not_blank)]
Value = Annotated[float, pydantic.Field(strict=True, ge=0, allow_inf_nan=False)]


class GenerateRequest(pydantic.BaseModel):
  query: Text
  behavior: Text | None = None  # null: the policy's default (most preferred) condition


class GenerateAnswer(pydantic.BaseModel):
  id: str  # the response id `/v1/feedback` takes
  response: str
  model_step: int
  behavior: str | None
  context: str


class FeedbackRequest(pydantic.BaseModel):
  id: Text
  event_id: Text  # the client's idempotency key
  type: Text  # one of serve.feedback_types, or its singular ("like" for "likes")
  value: Value | None = None  # null: 1


class FeedbackAnswer(pydantic.BaseModel):
  duplicate: bool


class Stats(pydantic.BaseModel):
  responses: int
  feedback_events: int
  model_step: int


class Health(pydantic.BaseModel):
  status: str
  model_step: int


# -- OpenAI's chat completions schema (the fields this server reads; others are ignored) ----------


class ContentPart(pydantic.BaseModel):
  type: str
  text: str | None = None


class ChatMessage(pydantic.BaseModel):
  role: Literal["system", "developer", "user", "assistant", "tool"]
  content: str | list[ContentPart] | None = None

  def text(self) -> str:
    if isinstance(self.content, list):
      return "".join(part.text or "" for part in self.content if part.type == "text")
    return self.content or ""


class ChatCompletionRequest(pydantic.BaseModel):
  model: str | None = None
  messages: Annotated[list[ChatMessage], pydantic.Field(min_length=1)]
  # Accepted for compatibility; the policy samples with its own config (config.sampling).
  max_tokens: Annotated[int, pydantic.Field(ge=1)] | None = None
  max_completion_tokens: Annotated[int, pydantic.Field(ge=1)] | None = None
  temperature: Annotated[float, pydantic.Field(ge=0, le=2)] | None = None
  n: Literal[1] = 1
  stream: bool = False
  # Extension: the behavior condition; null = the policy's default (the most preferred one).
  behavior: Text | None = None


class ChatCompletionMessage(pydantic.BaseModel):
  role: Literal["assistant"] = "assistant"
  content: str


class ChatChoice(pydantic.BaseModel):
  index: int = 0
  message: ChatCompletionMessage
  finish_reason: Literal["stop"] = "stop"


class ChatCompletion(pydantic.BaseModel):
  id: str  # = the response id `/v1/feedback` takes
  object: Literal["chat.completion"] = "chat.completion"
  created: int
  model: str
  choices: list[ChatChoice]
  # Extensions, as in /v1/generate: what the prompt held and which weights answered.
  behavior: str | None
  context: str
  model_step: int


class ErrorAnswer(pydantic.BaseModel):
  error: str


def _query_of(messages: list[ChatMessage]) -> str:
  """The policy answers one query: the last user message (system and history are not modelled)."""
  for message in reversed(messages):
    if message.role == "user" and message.text().strip():
      return message.text()
  raise fastapi.HTTPException(422, "field 'messages': no user message with text")


def _chat_completion(answer: dict[str, Any], model: str | None) -> ChatCompletion:
  return ChatCompletion(
    id=answer["id"],
    created=int(time.time()),
    model=model or "rlhb",
    choices=[ChatChoice(message=ChatCompletionMessage(content=answer["response"]))],
    behavior=answer["behavior"],
    context=answer["context"],
    model_step=answer["model_step"],
  )


def _sse(completion: ChatCompletion):
  """The whole answer as OpenAI's stream of chunks (generation is batched, not incremental)."""
  head = {k: getattr(completion, k) for k in ("id", "created", "model")}
  head["object"] = "chat.completion.chunk"
  content = completion.choices[0].message.content
  for delta, finish in (({"role": "assistant", "content": content}, None), ({}, "stop")):
    chunk = head | {"choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
    yield f"data: {json.dumps(chunk)}\n\n"
  yield "data: [DONE]\n\n"


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


async def _send_error(send: Any, status: int, message: str) -> None:
  body = json.dumps({"error": message}).encode()
  headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
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
_ERRORS = {code: {"model": ErrorAnswer} for code in (400, 404, 411, 413, 422, 500, 503)}


def build_app(server: FeedbackServer) -> fastapi.FastAPI:
  """The ASGI app of `server`: routes, schemas, error shapes and the body limit."""
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

  @app.exception_handler(RequestValidationError)
  async def invalid(request: fastapi.Request, e: RequestValidationError) -> JSONResponse:
    status, message = _validation_message(list(e.errors()))
    return JSONResponse({"error": message}, status)

  @app.exception_handler(Exception)
  async def internal(request: fastapi.Request, e: Exception) -> JSONResponse:
    log.exception("%s %s failed", request.method, request.url.path)
    return JSONResponse({"error": f"internal error: {type(e).__name__}"}, 500)

  @app.get("/", response_class=HTMLResponse, include_in_schema=False)
  def index() -> HTMLResponse:
    return HTMLResponse(server.page, headers=_PAGE_HEADERS)

  @app.post("/v1/generate", response_model=GenerateAnswer)
  def generate(body: GenerateRequest) -> dict[str, Any]:
    """Answers `query` under `behavior`; batched with concurrent requests."""
    return server.generate(body.query, body.behavior)

  @app.post("/v1/feedback", response_model=FeedbackAnswer)
  def feedback(body: FeedbackRequest) -> dict[str, Any]:
    """Records one behavior event about a response, once per `event_id`."""
    value = 1.0 if body.value is None else body.value
    return server.feedback(body.id, body.event_id, body.type, value)

  @app.post("/v1/chat/completions", response_model=ChatCompletion)
  def chat_completions(body: ChatCompletionRequest) -> Any:
    """OpenAI-compatible: the answer's `id` is the response id `/v1/feedback` takes."""
    answer = server.generate(_query_of(body.messages), body.behavior)
    completion = _chat_completion(answer, body.model)
    if body.stream:
      return StreamingResponse(_sse(completion), media_type="text/event-stream")
    return completion

  @app.get("/v1/stats", response_model=Stats)
  def stats() -> dict[str, Any]:
    return server.stats()

  @app.get("/healthz", response_model=Health)
  def health() -> dict[str, Any]:
    return server.health()

  app.add_middleware(_BodyLimit, limit=server.config.max_body_bytes)
  return app
