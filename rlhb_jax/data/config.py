"""Data section of the config: where the behavior log is and how bad records are handled."""

from __future__ import annotations

import dataclasses

FORMATS = ("auto", "jsonl", "parquet", "tfds")


@dataclasses.dataclass(frozen=True)
class DataConfig:
  path: str = ""  # behavior log (JSONL, Parquet, or a TFDS dir); empty = simulate
  on_error: str = "quarantine"  # fail | quarantine
  format: str = "auto"  # auto (by suffix; a directory is TFDS) | jsonl | parquet | tfds
  missing_behavior: str = "error"  # a configured behavior type absent from a record: error | zero
  quarantine_file: str = "quarantine.jsonl"  # in the run directory; bad lines with their reasons
  parquet_batch_rows: int = 8192  # rows per Parquet read batch (bounded memory)
  shuffle: bool = True  # grain pipeline: shuffle (seeded by config.seed, reshuffled per epoch)
  num_epochs: int = 0  # grain pipeline: epochs; 0 = repeat forever

  def __post_init__(self):
    if self.on_error not in ("fail", "quarantine"):
      raise ValueError(f"config.data.on_error={self.on_error!r}: expected fail or quarantine")
    if self.format not in FORMATS:
      raise ValueError(f"config.data.format={self.format!r}: expected one of {FORMATS}")
    if self.missing_behavior not in ("error", "zero"):
      raise ValueError(
        f"config.data.missing_behavior={self.missing_behavior!r}: expected error or zero"
      )
