"""Judges: who wins between two responses to one query (win / tie / loss from A's side)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol


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
  """Shares of win / tie / loss of system A over system B."""
  verdicts = [judge.compare(q, x, y) for q, x, y in zip(queries, a, b, strict=True)]
  n = max(len(verdicts), 1)
  return {k: verdicts.count(k) / n for k in ("win", "tie", "loss")}
