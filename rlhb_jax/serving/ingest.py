"""Screening identified events before they become training records: anomalous identities.

The store already gives each identity one vote per response and type, on responses it was shown,
and the gate caps its request rate; this is the last layer, on what a consumer reads. An identity is
anomalous when, among the events read:

- its volume is: more events (counted or not) than `volume_factor` x the median established
  identity's and more than `min_volume` (a script posting a thousand likes; a sender of a hundred
  answers' worth). Established: not young (some of its events came after its session's young
  period, or it is an API key), so that a crowd of fresh one-event identities cannot pull the
  median down and get an honest heavy user flagged;
- its agreement is: on at least `min_compared` responses where others reacted too (like or
  dislike), its reaction matches the most common of theirs on fewer than `min_agreement` of them
  (ties are not compared);
- it is part of a burst: young or one-event (new) identities, at least `burst_identities` of
  them, reacting to one answer (the same query and response text, whatever the response ids:
  every fresh identity gets its own id for the text it asks for), or young identities, at least
  `address_identities` of them, from one address (its keyed hash; API keys all come from the
  operator's clients, so only young sessions are counted).

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
  young: bool = False  # every event of it came from a young session

  @property
  def new(self) -> bool:
    """Young, or seen once: what a freshly minted identity looks like."""
    return self.young or self.events == 1

  @property
  def agreement(self) -> float | None:
    return self.agreed / self.compared if self.compared else None


@dataclasses.dataclass(frozen=True)
class Screened:
  kept: list[EventRow]  # what the records are built from
  quarantined: list[EventRow]  # the flagged identities' events, when quarantining
  flagged: dict[str, str]  # identity -> why it is anomalous
  stats: dict[str, IdentityStats]  # every identity read
  median_events: float  # events of the median established (not young) identity
  bursts: dict[str, int] = dataclasses.field(default_factory=dict)  # answer -> new identities
  crowded: dict[str, int] = dataclasses.field(default_factory=dict)  # address -> young ones


def identity_stats(
  events: Sequence[EventRow], reaction_types: Sequence[str] = REACTIONS
) -> dict[str, IdentityStats]:
  """Volume and agreement of every identity among `events` (unidentified events left out)."""
  volume = collections.Counter(e.identity for e in events if e.identity)
  grown = {e.identity for e in events if e.identity and not e.young}
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
  return {i: IdentityStats(n, compared[i], agreed[i], i not in grown) for i, n in volume.items()}


def bursts(
  events: Sequence[EventRow],
  stats: dict[str, IdentityStats],
  cfg: IngestConfig,
  reaction_types: Sequence[str] = REACTIONS,
) -> tuple[dict[str, str], dict[str, int], dict[str, int]]:
  """New identities in bursts: `(identity -> why, answer -> new identities reacting to it,
  address -> young identities from it)`, the last two for the answers and addresses over the
  limits."""
  on_answer: dict[tuple[str, str], set[str]] = collections.defaultdict(set)
  at_address: dict[str, set[str]] = collections.defaultdict(set)
  for e in events:
    if not e.identity:
      continue
    if e.address and stats[e.identity].young:
      at_address[e.address].add(e.identity)
    if e.type in reaction_types and stats[e.identity].new:
      on_answer[(e.query, e.response)].add(e.identity)
  why, answers, addresses = {}, {}, {}
  for (query, response), who in on_answer.items():
    if len(who) >= cfg.burst_identities:
      answer = f"{query[:60]!r} -> {response[:60]!r}"
      answers[answer] = len(who)
      for i in who:
        why[i] = f"burst: one of {len(who)} new identities reacting to the answer {answer}"
  for address, who in at_address.items():
    if len(who) >= cfg.address_identities:
      addresses[address] = len(who)
      for i in who:
        why.setdefault(i, f"burst: one of {len(who)} young identities from address {address}")
  return why, answers, addresses


def screen(
  events: Iterable[EventRow], cfg: IngestConfig, reaction_types: Sequence[str] = REACTIONS
) -> Screened:
  """Flags anomalous identities among `events`; with `cfg.quarantine`, sets their events apart."""
  events = list(events)
  stats = identity_stats(events, reaction_types)
  established = [s.events for s in stats.values() if not s.young]
  median = statistics.median(established) if established else 0.0
  flagged, answers, addresses = bursts(events, stats, cfg, reaction_types)
  for identity, s in stats.items():
    if identity in flagged:
      continue
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
    return Screened(events, [], flagged, stats, median, answers, addresses)
  kept = [e for e in events if e.identity not in flagged]
  quarantined = [e for e in events if e.identity in flagged]
  return Screened(kept, quarantined, flagged, stats, median, answers, addresses)


def quarantine_rows(screened: Screened) -> list[dict[str, Any]]:
  """The quarantined events as JSON-ready rows, each with the reason its identity was flagged."""
  return [
    dataclasses.asdict(e) | {"reason": screened.flagged[e.identity]} for e in screened.quarantined
  ]


def summary(screened: Screened) -> dict[str, Any]:
  """What a report says about the screening (counts, and each flagged identity with why)."""
  return {
    "identities": len(screened.stats),
    "young_identities": sum(s.young for s in screened.stats.values()),
    "median_events_per_identity": screened.median_events,
    "bursts": dict(sorted(screened.bursts.items(), key=lambda kv: -kv[1])),
    "crowded_addresses": dict(sorted(screened.crowded.items(), key=lambda kv: -kv[1])),
    "flagged": {
      i: {"reason": why, "events": screened.stats[i].events}
      for i, why in sorted(screened.flagged.items())
    },
    "quarantined_events": len(screened.quarantined),
    "not_counted_events": sum(not e.counted for e in screened.kept),
    "young_events": sum(e.young for e in screened.kept),
  }
