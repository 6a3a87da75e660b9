"""The serving logic without HTTP: request batching, behavior feedback, hot reload.

`FeedbackService` answers generation requests through a `Policy` (the model), records answers and
the behavior events users send back in a `FeedbackStore`, and swaps in newer weights between
batches. It knows nothing of HTTP: a refusal is a `ServiceError(status, message)`, which `http.py`
(FastAPI on uvicorn) answers as `{"error": message}` with that status (docs/SERVING.md).

Callers are admitted by its `Gate` (auth.py: `serve.auth`, rate limits); an answer is recorded as
shown to the identity that asked (the server minted that impression), and feedback is that
identity's one vote (the store decides), counted once its session is no longer young.

Threads: one batcher that gathers up to `batch_max_size` generation requests (or waits
`batch_timeout_ms` after the first) and calls the policy once; one watcher that calls
`policy.maybe_reload()` every `reload_poll_seconds`. Batches and reloads take the same lock, so new
weights are swapped in between batches and no queued request is dropped.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import logging
import queue
import threading
import time
from typing import Any, Protocol, runtime_checkable

from rlhb_jax.serving.auth import Caller, Gate
from rlhb_jax.serving.config import ServeConfig
from rlhb_jax.serving.errors import ServiceError
from rlhb_jax.serving.records import NotShownError, UnknownResponseError
from rlhb_jax.serving.store import FeedbackStore

__all__ = ["Caller", "EchoPolicy", "FeedbackService", "Policy", "ServiceError"]

log = logging.getLogger(__name__)


@runtime_checkable
class Policy(Protocol):
  """What the server needs from a model.

  `generate` is called from one thread at a time, never concurrently with `maybe_reload`. An
  optional attribute `default_behavior: str` is used for requests without a behavior (the most
  preferred behavior text); without it such requests reach `generate` as None. An optional method
  `context(query) -> str` gives the sentence of the search result the prompt of `query` carries
  ("" for none), and `source(query) -> str` the site it comes from; the server returns both with
  the answer, so a client shows what the model was conditioned on.
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


# Singular forms users try ("like", "click", "copy", "dwell") -> the stored plural type.
def _plural_forms(types: tuple[str, ...]) -> dict[str, str]:
  forms = {t: t for t in types}
  for t in types:
    if t.endswith("ies"):
      forms.setdefault(t[:-3] + "y", t)
    elif t.endswith("s"):
      forms.setdefault(t[:-1], t)
    head = t.split("_")[0]
    if head != t:
      forms.setdefault(head, t)
  return forms


@dataclasses.dataclass
class _Pending:
  """A generation request waiting for its batch."""

  query: str
  behavior: str | None
  identity: str  # who asked: recorded as shown the answer ("" = nobody identified)
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

  def submit(self, query: str, behavior: str | None, identity: str = "") -> dict[str, Any]:
    """Blocks until the request's batch ran; returns the answer (id, response, condition)."""
    if self._stopping.is_set():
      raise ServiceError(503, "server is shutting down")
    pending = _Pending(query, behavior, identity)
    self._queue.put(pending)
    if self._stopping.is_set():  # stop() may have drained the queue just before the put
      self._fail_queued()
    if not pending.done.wait(self._config.generate_timeout_seconds):
      raise ServiceError(503, "generation timed out")
    if pending.error is not None:
      raise ServiceError(503 if self._stopping.is_set() else 500, pending.error)
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
        source = getattr(self._policy, "source", lambda query: "")
        contexts = [(context(p.query), source(p.query)) for p in batch]
      if len(responses) != len(batch):
        raise RuntimeError(f"policy returned {len(responses)} responses for {len(batch)} queries")
    except Exception as e:
      log.exception("generation batch of %d failed", len(batch))
      self._fail(batch, f"generation failed: {type(e).__name__}: {e}")
      return
    self._store_and_answer(batch, behaviors, responses, contexts, model_step)

  def _store_and_answer(self, batch, behaviors, responses, contexts, model_step) -> None:
    try:
      ids = self._store.add_responses(
        [p.query for p in batch], behaviors, responses, model_step, [p.identity for p in batch]
      )
    except Exception as e:
      if len(batch) > 1:  # stored one by one: a request the store refuses fails alone
        for i in range(len(batch)):
          one = (x[i : i + 1] for x in (batch, behaviors, responses, contexts))
          self._store_and_answer(*one, model_step)
        return
      log.exception("storing a generated response failed")
      # The message names the error, never the request's text (the store's error quotes it).
      self._fail(batch, f"generation failed: the answer could not be stored ({type(e).__name__})")
      return
    self._answer(batch, ids, responses, behaviors, contexts, model_step)

  @staticmethod
  def _fail(batch: list[_Pending], error: str) -> None:
    for p in batch:
      p.error = error
      p.done.set()

  @staticmethod
  def _answer(batch, ids, responses, behaviors, contexts, model_step) -> None:
    for p, rid, response, behavior, ctx in zip(
      batch, ids, responses, behaviors, contexts, strict=True
    ):
      p.result = {
        "id": rid,
        "response": response,
        "model_step": model_step,
        "behavior": behavior,
        "context": ctx[0],
        "source": ctx[1],
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


class FeedbackService:
  """Batcher, reload watcher and feedback store behind one policy; `start()`, then the endpoints
  (`generate`, `show`, `feedback`, `stats`, `health`), then `stop()`.

  `gate` admits callers (`serve.auth`, rate limits); the endpoints take the `Caller` it returns, or
  None for an in-process call that nobody made (identity "").
  """

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
    self._types = _plural_forms(config.feedback_types)
    self.gate = Gate(config, store)

  def start(self) -> None:
    self._batcher.thread.start()
    self._watcher.start()

  def stop(self) -> None:
    """Queued requests fail with 503; the store closes if the service opened it."""
    self._stopping.set()
    self._batcher.stop()
    if self._watcher.is_alive():
      self._watcher.join()
    if self._own_store:
      self.store.close()

  def _watch(self) -> None:
    while not self._stopping.wait(self.config.reload_poll_seconds):
      try:
        self.gate.refresh()  # a rotated session secret (mode=keys) takes effect here
      except Exception:
        log.exception("reading the store's secrets failed; keeping the current ones")
      try:
        with self._policy_lock:
          if self.policy.maybe_reload():
            log.info("policy reloaded: model_step=%d", self.policy.model_step)
      except Exception:
        log.exception("policy reload failed; keeping the current weights")

  def generate(
    self, query: str, behavior: str | None, caller: Caller | None = None
  ) -> dict[str, Any]:
    return self._batcher.submit(query, behavior, caller.identity if caller else "")

  def show(self, rid: str, caller: Caller | None = None) -> dict[str, Any]:
    """A stored response. Reading it is an impression (feedback on it is then accepted) only for
    an API key: a client the operator vouches for, that shows answers in its own feed. A session
    that reads an answer by id was not shown it by this server, and may not react to it."""
    impression = caller.identity if caller and caller.is_key else ""
    try:
      row = self.store.show(rid, impression)
    except UnknownResponseError:
      raise ServiceError(404, f"unknown response id {rid!r}") from None
    return {
      "id": row.id,
      "query": row.query,
      "response": row.response,
      "model_step": row.model_step,
      "behavior": row.behavior,
    }

  def feedback(
    self, rid: str, event_id: str, kind: str, value: float, caller: Caller | None = None
  ) -> dict[str, Any]:
    """Records one event; `{"duplicate": true}` when its event id was seen (from this caller), or
    the caller already voted this type on the response. A young session's vote is stored, not
    counted, and answered as any other (the answer does not tell a script when it has aged)."""
    if kind not in self._types:
      raise ServiceError(
        422, f"field 'type': {kind!r} is not one of {list(self.config.feedback_types)}"
      )
    kind = self._types[kind]
    identity = caller.identity if caller else ""
    if identity and value != 1 and kind not in self.config.valued_types:
      raise ServiceError(
        422, f"field 'value': a {kind!r} event is one vote, value 1 (got {value:g})"
      )
    if value > self.config.max_value:
      raise ServiceError(
        422, f"field 'value': at most {self.config.max_value:g} (serve.max_value), got {value:g}"
      )
    young = caller is not None and self.gate.is_young(caller)
    try:
      counted = self.store.add_event(
        rid,
        event_id,
        kind,
        float(value),
        identity,
        self.config.reaction_types,
        address=self.gate.address_key(caller.address) if caller else "",
        young=young,
        young_impressions=self.config.young_impressions if caller and caller.issued else 0,
      )
    except UnknownResponseError:
      raise ServiceError(404, f"unknown response id {rid!r}") from None
    except NotShownError:
      raise ServiceError(
        403, f"response {rid!r} was not shown to this caller: no feedback on it"
      ) from None
    return {"duplicate": not counted}

  def stats(self) -> dict[str, Any]:
    counts = self.store.counts()
    return {
      "responses": counts["responses"],
      "feedback_events": counts["events"],
      "model_step": int(self.policy.model_step),
    }

  def health(self) -> dict[str, Any]:
    if not self._batcher.thread.is_alive():
      raise ServiceError(503, "batcher thread is not running")
    return {"status": "ok", "model_step": int(self.policy.model_step)}
