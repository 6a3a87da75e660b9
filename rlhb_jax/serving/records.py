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


def aggregate_records(
  events: Iterable[EventRow], behavior_types: Sequence[str] = (), source: str = "serve"
) -> list[dict[str, Any]]:
  """Consumed events as behavior log records (RLHB.md section 7), one per response.

  Each record sums the values of its response's events per type (`{"likes": 3, ...}`); every type in
  `behavior_types` is present (0 when no event came), other types seen are kept too. Integral sums
  are ints, so counts stay integers while `dwell_seconds` may be a float. The timestamp is that of
  the latest event. A response whose events straddle two `read_new` calls yields one record per
  call, with disjoint counts.
  """
  grouped: dict[str, list[EventRow]] = collections.defaultdict(list)
  for event in events:
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
          "events": len(group),
        },
      }
    )
  return records
