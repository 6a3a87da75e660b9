"""Judges: who wins between two responses to one query (win / tie / loss from A's side).

`SimulatedUsersJudge` is the simulator's ground truth. `LLMJudge` (any causal LM this framework
loads) and `HTTPJudge` (an OpenAI-compatible chat endpoint) are pairwise judges: each pair is shown
in both orders, and a verdict that flips with the order (position bias) counts as a tie.
See docs/JUDGES.md.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import re
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from typing import Protocol

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rlhb_jax.data.batches import pad_prompts
from rlhb_jax.model.llama import positions_from_mask


class Judge(Protocol):
  def compare(self, query: str, a: str, b: str) -> str:
    """'win' if A is better, 'loss' if B is, 'tie' otherwise."""
    ...


class SimulatedUsersJudge:
  """The simulator's ground truth: the probability a random user prefers A over B.

  A margin of `tie_margin` around 0.5 counts as a tie (identical answers always tie).
  """

  def __init__(self, simulator, tie_margin: float = 0.05, round: int | None = None):
    self.sim = simulator
    self.tie_margin = tie_margin
    self.round = round

  def compare(self, query: str, a: str, b: str) -> str:
    p = self.sim.win_prob(query, a, b, self.round)
    if p > 0.5 + self.tie_margin:
      return "win"
    if p < 0.5 - self.tie_margin:
      return "loss"
    return "tie"


def win_tie_loss(judge: Judge, queries: Sequence[str], a: Sequence[str], b: Sequence[str]) -> dict:
  """Shares of win / tie / loss of system A over system B (batched when the judge can)."""
  if hasattr(judge, "compare_many"):
    if not len(queries) == len(a) == len(b):
      raise ValueError(f"{len(queries)} queries, {len(a)} A responses, {len(b)} B responses")
    verdicts = list(judge.compare_many(queries, a, b))
  else:
    verdicts = [judge.compare(q, x, y) for q, x, y in zip(queries, a, b, strict=True)]
  n = max(len(verdicts), 1)
  return {k: verdicts.count(k) / n for k in ("win", "tie", "loss")}


# -- Pairwise judges: both orders, inconsistent verdicts are ties ---------------------------------

DEFAULT_TEMPLATE = (
  "Question:\n{query}\n\n"
  "Response {label_a}:\n{first}\n\n"
  "Response {label_b}:\n{second}\n\n"
  "Which response is better? Answer with one letter, {label_a} or {label_b}."
)
PLAIN_ANSWER_SUFFIX = "\nAnswer:"  # ends the prompt when no chat template is used
SLOTS = ("first", "second", "tie")  # one order's verdict: the slot it prefers, or no preference


def combine_verdicts(first: str, second_swapped: str) -> str:
  """A's verdict from the two orders' slot verdicts.

  `first` judged (A, B) (A in the first slot); `second_swapped` judged (B, A). Each is "first",
  "second" or "tie". Both orders preferring A ("first", "second") is a win, both preferring B
  ("second", "first") a loss; a judge that prefers the same slot in both orders (position bias),
  or has no preference in either, gives a tie.
  """
  for v in (first, second_swapped):
    if v not in SLOTS:
      raise ValueError(f"order verdict {v!r}: expected one of {SLOTS}")
  if (first, second_swapped) == ("first", "second"):
    return "win"
  if (first, second_swapped) == ("second", "first"):
    return "loss"
  return "tie"


def pairwise_prompt(
  template: str, query: str, first: str, second: str, labels: tuple[str, str]
) -> str:
  """The user message for one order: `first` shown as `labels[0]`, `second` as `labels[1]`."""
  return template.format(
    query=query, first=first, second=second, label_a=labels[0], label_b=labels[1]
  )


def _both_orders(queries, a, b) -> list[tuple[str, str, str]]:
  """(query, first, second) for every pair in both orders: (A, B) then (B, A), pair after pair."""
  if not len(queries) == len(a) == len(b):
    raise ValueError(f"{len(queries)} queries, {len(a)} A responses, {len(b)} B responses")
  return [o for q, x, y in zip(queries, a, b, strict=True) for o in ((q, x, y), (q, y, x))]


def _combine_pairs(slots: Sequence[str]) -> list[str]:
  return [combine_verdicts(x, y) for x, y in zip(slots[0::2], slots[1::2], strict=True)]


@jax.jit
def label_logprobs_jit(graphdef, state, tokens, mask, label_ids):
  """Next-token log-probs (B, 2) of the two label tokens after left-padded prompts (B, P).

  Only the last position goes through the LM head, so memory is (B, V), not (B, P, V).
  """
  model = nnx.merge(graphdef, state)
  h, _ = model.trunk(tokens, positions_from_mask(mask), mask)
  logp = jax.nn.log_softmax(model.logits(h[:, -1:])[:, 0].astype(jnp.float32), axis=-1)
  return logp[:, label_ids]


class LLMJudge:
  """A causal LM as a pairwise judge: which label does it say next, for both orders of the pair.

  Each pair becomes two prompts, (A, B) and (B, A). Both run in one jitted forward (left-padded to a
  bucketed length; `batch_size` pairs, i.e. 2 * batch_size rows, per call; the last batch is padded
  with copies so shapes never change). An order's verdict is the label whose next token has the
  higher log-prob, or "tie" if they differ by no more than `margin`; `combine_verdicts` turns the
  two orders into win / tie / loss.

  The label tokens: after a chat template (the prompt ends with the assistant's turn opener) the
  answer starts bare, so "A" / "B" are tried first, then " A" / " B"; without one (the prompt ends
  with "Answer:") the order is reversed. The first spelling whose two labels are single, distinct
  tokens is used (`self.label_ids`); none being so is an error.

  Args:
    model: any `Transformer` this framework loads (or a module with the same `trunk` / `logits`).
    tokenizer: a `Tokenizer` (encode, chat_prompt, pad_id).
    template: the user message, with fields {query} {first} {second} {label_a} {label_b}.
    labels: the names of the two slots.
    batch_size: pairs per forward.
    chat_template: wrap the message in the tokenizer's chat template; else plain text + "Answer:".
    margin: log-prob difference at or below which an order has no preference.
    buckets: prompt lengths padded to (the longest prompt must fit the largest).
  """

  def __init__(
    self,
    model,
    tokenizer,
    template: str = DEFAULT_TEMPLATE,
    labels: tuple[str, str] = ("A", "B"),
    batch_size: int = 8,
    chat_template: bool = True,
    margin: float = 0.0,
    buckets: Sequence[int] = (128, 256, 512, 1024, 2048, 4096),
  ):
    if len(labels) != 2 or labels[0] == labels[1]:
      raise ValueError(f"labels must be two distinct strings, got {labels!r}")
    self.model, self.tokenizer, self.template = model, tokenizer, template
    self.labels = tuple(labels)
    self.batch_size, self.chat_template, self.margin = batch_size, chat_template, margin
    self.buckets = tuple(sorted(buckets))
    self.label_ids = self._label_ids()

  def _label_ids(self) -> tuple[int, int]:
    spellings = ("{}", " {}") if self.chat_template else (" {}", "{}")
    for s in spellings:
      ids = [self.tokenizer.encode(s.format(label)) for label in self.labels]
      if all(len(i) == 1 for i in ids) and ids[0] != ids[1]:
        return ids[0][0], ids[1][0]
    raise ValueError(
      f"labels {self.labels!r}: neither bare nor space-prefixed is one token each; pick labels the "
      "tokenizer has as single tokens"
    )

  def prompt_ids(self, query: str, first: str, second: str) -> list[int]:
    """Token ids of one order's prompt."""
    message = pairwise_prompt(self.template, query, first, second, self.labels)
    if self.chat_template:
      return self.tokenizer.chat_prompt(message)
    return self.tokenizer.encode(message + PLAIN_ANSWER_SUFFIX)

  def label_logprobs(self, prompts: Sequence[Sequence[int]]) -> np.ndarray:
    """(N, 2) log-probs of the two label tokens after each prompt, in fixed-size batches."""
    if not prompts:
      return np.zeros((0, 2), np.float32)
    longest = max(len(p) for p in prompts)
    if longest > self.buckets[-1]:
      raise ValueError(
        f"a judge prompt has {longest} tokens, more than the largest bucket {self.buckets[-1]}: "
        "pass longer `buckets` (within the model's context) or shorten the responses"
      )
    graphdef, state = nnx.split(self.model)
    label_ids = jnp.asarray(self.label_ids, jnp.int32)
    rows, out = 2 * self.batch_size, []
    for start in range(0, len(prompts), rows):
      chunk = list(prompts[start : start + rows])
      n = len(chunk)
      tokens, mask = pad_prompts(
        chunk + [chunk[0]] * (rows - n), self.buckets, self.tokenizer.pad_id
      )
      out.append(np.asarray(label_logprobs_jit(graphdef, state, tokens, mask, label_ids))[:n])
    return np.concatenate(out)

  def order_verdicts(self, queries: Sequence[str], a: Sequence[str], b: Sequence[str]) -> list[str]:
    """Slot verdicts ("first" / "second" / "tie") of (A, B) then (B, A) for each pair, flat."""
    prompts = [self.prompt_ids(*o) for o in _both_orders(queries, a, b)]
    diff = self.label_logprobs(prompts) @ np.array([1.0, -1.0])
    return ["first" if d > self.margin else "second" if d < -self.margin else "tie" for d in diff]

  def compare_many(self, queries: Sequence[str], a: Sequence[str], b: Sequence[str]) -> list[str]:
    """A's verdict ("win" / "tie" / "loss") for each (query, A, B)."""
    return _combine_pairs(self.order_verdicts(queries, a, b))

  def compare(self, query: str, a: str, b: str) -> str:
    return self.compare_many([query], [a], [b])[0]


def parse_label(reply: str, labels: tuple[str, str] = ("A", "B")) -> str:
  """The slot a free-text reply names: "first", "second", or "tie" when it names neither or both.

  "A", " a.", "**B**", "Response B" and "B is better" are read; a reply naming both labels as
  standalone words ("A is worse than B") is undecidable and counts as no preference.
  """
  cleaned = reply.strip().strip("*_`'\"().:[] \n").strip()
  for slot, label in zip(("first", "second"), labels, strict=True):
    if cleaned.lower() == label.lower():
      return slot
  found = {
    slot
    for slot, label in zip(("first", "second"), labels, strict=True)
    if re.search(rf"(?<![A-Za-z0-9]){re.escape(label)}(?![A-Za-z0-9])", reply)
  }
  return found.pop() if len(found) == 1 else "tie"


class HTTPJudge:
  """A pairwise judge behind an OpenAI-compatible chat completions endpoint (vLLM, llama.cpp's
  server, OpenAI, ...), standard library only.

  Sends `pairwise_prompt` for both orders as one user message each to
  `{base_url}/chat/completions` (base_url as the OpenAI SDK takes it, e.g.
  "http://localhost:8000/v1"), greedy (temperature 0) and short (`max_tokens`), reads the label
  with `parse_label` and combines the two orders with `combine_verdicts`.

  Args:
    base_url: the API root, ending in /v1.
    model: the served model's name (the request's "model").
    api_key_env: environment variable holding the API key, sent as a Bearer token when set (a
      local server usually needs none); None never sends one.
    timeout: seconds per request.
    max_tokens: reply length cap.
    retries: extra tries on HTTP 429 / 5xx and connection errors, with `backoff` * 2**try seconds.
    max_workers: concurrent requests in `compare_many`.
  """

  def __init__(
    self,
    base_url: str,
    model: str,
    api_key_env: str | None = "OPENAI_API_KEY",
    timeout: float = 60.0,
    template: str = DEFAULT_TEMPLATE,
    labels: tuple[str, str] = ("A", "B"),
    max_tokens: int = 8,
    retries: int = 2,
    backoff: float = 1.0,
    max_workers: int = 4,
  ):
    self.url = base_url.rstrip("/") + "/chat/completions"
    self.model, self.api_key_env, self.timeout = model, api_key_env, timeout
    self.template, self.labels, self.max_tokens = template, tuple(labels), max_tokens
    self.retries, self.backoff, self.max_workers = retries, backoff, max_workers

  def _headers(self) -> dict[str, str]:
    headers = {"Content-Type": "application/json"}
    key = os.environ.get(self.api_key_env) if self.api_key_env else None
    if key:
      headers["Authorization"] = f"Bearer {key}"
    return headers

  def complete(self, message: str) -> str:
    """The assistant's reply to one user message."""
    body = {
      "model": self.model,
      "messages": [{"role": "user", "content": message}],
      "temperature": 0,
      "max_tokens": self.max_tokens,
    }
    data = json.dumps(body).encode()
    for attempt in range(self.retries + 1):
      request = urllib.request.Request(self.url, data, self._headers(), method="POST")
      try:
        with urllib.request.urlopen(request, timeout=self.timeout) as response:
          raw = response.read()
        break
      except urllib.error.HTTPError as e:
        if attempt < self.retries and (e.code == 429 or e.code >= 500):
          time.sleep(self.backoff * 2**attempt)
          continue
        detail = e.read().decode(errors="replace")[:500]
        raise RuntimeError(f"judge endpoint {self.url}: HTTP {e.code} {e.reason}: {detail}") from e
      except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
        if attempt < self.retries:
          time.sleep(self.backoff * 2**attempt)
          continue
        reason = getattr(e, "reason", e)
        raise RuntimeError(f"judge endpoint {self.url}: cannot reach it: {reason}") from e
    try:
      return json.loads(raw)["choices"][0]["message"]["content"] or ""
    except (ValueError, KeyError, IndexError, TypeError) as e:
      raise RuntimeError(f"judge endpoint {self.url}: not a chat completion: {raw[:500]!r}") from e

  def order_verdicts(self, queries: Sequence[str], a: Sequence[str], b: Sequence[str]) -> list[str]:
    """Slot verdicts ("first" / "second" / "tie") of (A, B) then (B, A) for each pair, flat."""
    messages = [
      pairwise_prompt(self.template, *o, self.labels) for o in _both_orders(queries, a, b)
    ]
    with concurrent.futures.ThreadPoolExecutor(self.max_workers) as pool:
      replies = list(pool.map(self.complete, messages))
    return [parse_label(r, self.labels) for r in replies]

  def compare_many(self, queries: Sequence[str], a: Sequence[str], b: Sequence[str]) -> list[str]:
    """A's verdict ("win" / "tie" / "loss") for each (query, A, B)."""
    return _combine_pairs(self.order_verdicts(queries, a, b))

  def compare(self, query: str, a: str, b: str) -> str:
    return self.compare_many([query], [a], [b])[0]
