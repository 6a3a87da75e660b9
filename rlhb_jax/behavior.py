"""Behaviors as natural language (placeholder; see issue 3)."""

import dataclasses


@dataclasses.dataclass(frozen=True)
class BehaviorConfig:
  num_bins: int = 5  # N equal bins over log(1 + x)
