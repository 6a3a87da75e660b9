"""Simulator section of the config (placeholder; see issue 3)."""

import dataclasses


@dataclasses.dataclass(frozen=True)
class SimConfig:
  num_records: int = 4000  # log records mode=simulate writes
