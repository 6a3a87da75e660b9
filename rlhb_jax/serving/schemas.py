"""The HTTP API's request and answer schemas (pydantic): they validate bodies with strict types
(`"1"` is not a number, `true` is not a value) and publish the API at `/openapi.json`."""

from __future__ import annotations

import json
import time
from typing import Annotated, Any, Literal

import pydantic

from rlhb_jax.serving.service import ServiceError


def storable(value: str) -> str | None:
  """Why `value` cannot be stored as text (UTF-8 in SQLite and PostgreSQL), or None if it can:
  a lone surrogate ("\\ud800", which JSON can spell) has no UTF-8 form, and PostgreSQL refuses
  NUL characters in text."""
  if "\x00" in value:
    return "must not hold NUL characters"
  try:
    value.encode("utf-8")
  except UnicodeEncodeError:
    return "is not valid Unicode text (lone surrogate)"
  return None


def _text(value: str) -> str:
  if not value.strip():
    raise ValueError("must not be empty")
  why = storable(value)
  if why is not None:
    raise ValueError(why)
  return value


Text = Annotated[pydantic.StrictStr, pydantic.AfterValidator(_text)]
Value = Annotated[float, pydantic.Field(strict=True, ge=0, allow_inf_nan=False)]


class GenerateRequest(pydantic.BaseModel):
  query: Text
  behavior: Text | None = None  # null: the policy's default (most preferred) condition


class GenerateAnswer(pydantic.BaseModel):
  id: str  # the response id `/v1/feedback` takes
  response: str
  model_step: int
  behavior: str | None
  context: str  # the search result's sentence ("" for none)
  source: str = ""  # the site it comes from ("" when it names none)


class FeedbackRequest(pydantic.BaseModel):
  id: Text
  event_id: Text  # the client's idempotency key
  type: Text  # one of serve.feedback_types, or its singular ("like" for "likes")
  value: Value | None = None  # null: 1


class FeedbackAnswer(pydantic.BaseModel):
  duplicate: bool  # true: the event does not count (event id seen, or a repeated vote)


class ShownAnswer(pydantic.BaseModel):
  """A stored response, as `GET /v1/responses/{id}` shows it (the caller may then react to it)."""

  id: str
  query: str
  response: str
  model_step: int
  behavior: str | None


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
  source: str = ""
  model_step: int


class ErrorAnswer(pydantic.BaseModel):
  error: str


def query_of(messages: list[ChatMessage]) -> str:
  """The policy answers one query: the last user message (system and history are not modelled)."""
  for message in reversed(messages):
    if message.role == "user" and message.text().strip():
      why = storable(message.text())
      if why is not None:
        raise ServiceError(422, f"field 'messages': the user message {why}")
      return message.text()
  raise ServiceError(422, "field 'messages': no user message with text")


def chat_completion(answer: dict[str, Any], model: str | None) -> ChatCompletion:
  return ChatCompletion(
    id=answer["id"],
    created=int(time.time()),
    model=model or "rlhb",
    choices=[ChatChoice(message=ChatCompletionMessage(content=answer["response"]))],
    behavior=answer["behavior"],
    context=answer["context"],
    source=answer.get("source", ""),
    model_step=answer["model_step"],
  )


def sse(completion: ChatCompletion):
  """The whole answer as OpenAI's stream of chunks (generation is batched, not incremental)."""
  head = {k: getattr(completion, k) for k in ("id", "created", "model")}
  head["object"] = "chat.completion.chunk"
  content = completion.choices[0].message.content
  for delta, finish in (({"role": "assistant", "content": content}, None), ({}, "stop")):
    chunk = head | {"choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
    yield f"data: {json.dumps(chunk)}\n\n"
  yield "data: [DONE]\n\n"
