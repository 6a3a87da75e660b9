"""Screening identified events before they become training records: anomalous identities.

The store already gives each identity one vote per response and type, on responses it was shown,
and the gate caps its request rate; this is the last layer, on what a consumer reads. An identity is
anomalous when, among the events read:

- its volume is: more events (counted or not) than `volume_factor` x the median identity's and
  more than `min_volume` (a script posting a thousand likes; a sender of a hundred answers' worth);
- its agreement is: on at least `min_compared` responses where others reacted too (like or
  dislike), its reaction matches the most common of theirs on fewer than `min_agreement` of them
  (ties are not compared).

With `quarantine`, their events are set aside (returned apart, to be written out and counted, like
bad lines of a log) and the records are built from the rest. Unidentified events (identity "",
`serve.auth=none`) are never grouped, flagged or set aside.
"""

from __future__ import annotations

import collections
import dataclasses
import statistics
from collections.abc import Iterable, Sequence
from typing import Any

from rlhb_jax.serving.config import IngestConfig
from rlhb_jax.serving.records import REACTIONS, EventRow


@dataclasses.dataclass(frozen=True)
class IdentityStats:
  events: int  # events read from it, counted or not
  compared: int  # responses where it and others reacted (no tie among the others)
  agreed: int  # of those, where its reaction was the others' most common one

  @property
  def agreement(self) -> float | None:
    return self.agreed / self.compared if self.compared else None


@dataclasses.dataclass(frozen=True)
class Screened:
  kept: list[EventRow]  # what the records are built from
  quarantined: list[EventRow]  # the flagged identities' events, when quarantining
  flagged: dict[str, str]  # identity -> why it is anomalous
  stats: dict[str, IdentityStats]  # every identity read
  median_events: float  # events of the median identity


def identity_stats(
  events: Sequence[EventRow], reaction_types: Sequence[str] = REACTIONS
) -> dict[str, IdentityStats]:
  """Volume and agreement of every identity among `events` (unidentified events left out)."""
  volume = collections.Counter(e.identity for e in events if e.identity)
  reactions: dict[str, dict[str, str]] = collections.defaultdict(dict)  # response -> who -> type
  for e in events:  # in seq order: the latest counted reaction stands
    if e.identity and e.counted and e.type in reaction_types:
      reactions[e.response_id][e.identity] = e.type
  compared: collections.Counter[str] = collections.Counter()
  agreed: collections.Counter[str] = collections.Counter()
  for by_identity in reactions.values():
    if len(by_identity) < 2:
      continue
    totals = collections.Counter(by_identity.values())
    for identity, mine in by_identity.items():
      others = totals.copy()
      others[mine] -= 1
      top = others.most_common(2)
      if top[0][1] == 0 or (len(top) > 1 and top[0][1] == top[1][1]):
        continue  # the others did not react, or are split evenly
      compared[identity] += 1
      agreed[identity] += top[0][0] == mine
  return {i: IdentityStats(n, compared[i], agreed[i]) for i, n in volume.items()}


def screen(
  events: Iterable[EventRow], cfg: IngestConfig, reaction_types: Sequence[str] = REACTIONS
) -> Screened:
  """Flags anomalous identities among `events`; with `cfg.quarantine`, sets their events apart."""
  events = list(events)
  stats = identity_stats(events, reaction_types)
  median = statistics.median(s.events for s in stats.values()) if stats else 0.0
  flagged = {}
  for identity, s in stats.items():
    if s.events > max(cfg.min_volume, cfg.volume_factor * median):
      flagged[identity] = (
        f"volume: {s.events} events, over {cfg.volume_factor:g} x the median identity's "
        f"{median:g} and over {cfg.min_volume}"
      )
    elif s.compared >= cfg.min_compared and s.agreed < cfg.min_agreement * s.compared:
      flagged[identity] = (
        f"agreement: reacted as most others did on {s.agreed} of {s.compared} shared responses, "
        f"under {cfg.min_agreement:g}"
      )
  if not cfg.quarantine or not flagged:
    return Screened(events, [], flagged, stats, median)
  kept = [e for e in events if e.identity not in flagged]
  quarantined = [e for e in events if e.identity in flagged]
  return Screened(kept, quarantined, flagged, stats, median)


def quarantine_rows(screened: Screened) -> list[dict[str, Any]]:
  """The quarantined events as JSON-ready rows, each with the reason its identity was flagged."""
  return [
    dataclasses.asdict(e) | {"reason": screened.flagged[e.identity]} for e in screened.quarantined
  ]


def summary(screened: Screened) -> dict[str, Any]:
  """What a report says about the screening (counts, and each flagged identity with why)."""
  return {
    "identities": len(screened.stats),
    "median_events_per_identity": screened.median_events,
    "flagged": {
      i: {"reason": why, "events": screened.stats[i].events}
      for i, why in sorted(screened.flagged.items())
    },
    "quarantined_events": len(screened.quarantined),
    "not_counted_events": sum(not e.counted for e in screened.kept),
  }
