"""What the feedback store holds and hands out: its rows, the consumer's cursor, and the log
records (RLHB.md section 7) that consumed events become."""

from __future__ import annotations

import collections
import dataclasses
import math
from collections.abc import Iterable, Sequence
from typing import Any

CURSOR_KEYS = ("responses", "events")


class UnknownResponseError(KeyError):
  """Feedback names a response id the store has never served."""


class NotShownError(PermissionError):
  """Feedback from an identity the store never recorded as shown the response."""


@dataclasses.dataclass(frozen=True)
class ResponseRow:
  """One served response."""

  seq: int
  id: str
  query: str
  behavior: str | None  # the behavior condition it was generated under; None = policy default
  response: str
  model_step: int
  created_at: str  # ISO 8601, UTC
  identity: str = ""  # who asked for it; "" = nobody identified (serve.auth=none)


@dataclasses.dataclass(frozen=True)
class EventRow:
  """One behavior event, joined with the response it is about."""

  seq: int
  event_id: str
  response_id: str
  type: str
  value: float
  created_at: str
  query: str
  response: str
  behavior: str | None
  model_step: int
  identity: str = ""  # who sent it; "" = nobody identified (serve.auth=none)
  # False: a repeated vote (the identity had already voted this type on the response, in this
  # read or an earlier one), or a young session's vote: stored so that volume can be told, but not
  # counted.
  counted: bool = True
  replaces: int | None = None  # seq of the identity's earlier reaction this one replaces
  address: str = ""  # keyed hash of the sender's address (its /64 for IPv6); "" = not recorded
  young: bool = False  # from a session too young to count (serve.young_seconds, ...)


@dataclasses.dataclass(frozen=True)
class KeyRow:
  """One API key, without its secret (the store keeps only its hash)."""

  id: str
  name: str
  created_at: str
  revoked_at: str | None  # None: active


@dataclasses.dataclass(frozen=True)
class Feed:
  """What `read_new` returns: rows committed after the cursor, each list in `seq` order."""

  responses: list[ResponseRow]
  events: list[EventRow]


def start_cursor() -> dict[str, int]:
  """The cursor of a consumer that has read nothing yet."""
  return dict.fromkeys(CURSOR_KEYS, 0)


def check_cursor(cursor: dict[str, int] | None) -> dict[str, int]:
  if cursor is None:
    return start_cursor()
  if set(cursor) != set(CURSOR_KEYS) or not all(
    isinstance(cursor[k], int) and cursor[k] >= 0 for k in CURSOR_KEYS
  ):
    raise ValueError(f"cursor {cursor!r}: expected {{'responses': int >= 0, 'events': int >= 0}}")
  return dict(cursor)


def _plain_number(total: float) -> int | float:
  return int(total) if math.isfinite(total) and total == int(total) else total


REACTIONS = ("likes", "dislikes")  # an identity's latest of these replaces its earlier one


def one_vote(
  events: Iterable[EventRow], reaction_types: Sequence[str] = REACTIONS
) -> list[EventRow]:
  """The events that count, in their order: those the store counted, and of those at most one per
  identity, answer and type; of `reaction_types`, one per identity and answer (the latest). An
  answer is a query and a response text: an identity that asks the same query again and likes
  each of the identical answers (new response ids) holds one vote on that answer, not one each.

  The store already refuses repeated votes as it writes them; this re-applies the rule to what a
  consumer reads (defence in depth: rows written by another producer, or by an older version).
  Unattributed events (identity "", serve.auth=none) are not grouped: they all count.
  """
  kept: list[EventRow | None] = []
  voted: dict[tuple[str, ...], int] = {}  # (query, response, identity, type or group) -> index
  for event in events:
    if not event.counted:
      continue
    if event.identity:
      group = "|".join(reaction_types) if event.type in reaction_types else event.type
      key = (event.query, event.response, event.identity, group)
      if key in voted:
        if event.type not in reaction_types:
          continue  # a repeat: the first vote stands
        kept[voted[key]] = None  # a reaction: the latest stands
      voted[key] = len(kept)
    kept.append(event)
  return [e for e in kept if e is not None]


def aggregate_records(
  events: Iterable[EventRow],
  behavior_types: Sequence[str] = (),
  source: str = "serve",
  cap: bool = True,
  reaction_types: Sequence[str] = REACTIONS,
) -> list[dict[str, Any]]:
  """Consumed events as behavior log records (RLHB.md section 7), one per response.

  Each record sums the values of its response's counting events per type (`{"likes": 3, ...}`):
  with `cap`, the events `one_vote` keeps, so a type's count is the number of distinct identities
  that voted it; without, every event the store counted. Every type in `behavior_types` is present
  (0 when no event came), other types seen are kept too. Integral sums are ints, so counts stay
  integers while `dwell_seconds` may be a float. The timestamp is that of the latest event. A
  response whose events straddle two `read_new` calls yields one record per call, with disjoint
  counts; a response none of whose events counts yields none.
  """
  events = list(events)
  counting = one_vote(events, reaction_types) if cap else [e for e in events if e.counted]
  read = collections.Counter(e.response_id for e in events)
  grouped: dict[str, list[EventRow]] = collections.defaultdict(list)
  for event in counting:
    grouped[event.response_id].append(event)
  records = []
  for response_id, group in grouped.items():
    totals: dict[str, float] = dict.fromkeys(behavior_types, 0.0)
    for event in group:
      totals[event.type] = totals.get(event.type, 0.0) + event.value
    first = group[0]
    records.append(
      {
        "id": response_id,
        "query": first.query,
        "response": first.response,
        "behavior": {k: _plain_number(v) for k, v in totals.items()},
        "timestamp": max(e.created_at for e in group),
        "meta": {
          "source": source,
          "behavior_condition": first.behavior,
          "model_step": first.model_step,
          "events": read[response_id],  # read for this response, counted or not
          "identities": len({e.identity for e in group if e.identity}),
        },
      }
    )
  return records
