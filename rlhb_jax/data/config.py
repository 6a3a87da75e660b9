"""Data section of the config (placeholder; see issue 3)."""

import dataclasses


@dataclasses.dataclass(frozen=True)
class DataConfig:
  path: str = ""  # behavior log (JSONL, Parquet, or a TFDS dir); empty = simulate
  on_error: str = "quarantine"  # fail | quarantine
