"""Data sections of the config: where the behavior log is, how bad records are handled, and how
(query, behavior, response) become text."""

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


@dataclasses.dataclass(frozen=True)
class PromptConfig:
  """How (query, behavior, response) become text for the generator and the discriminator."""

  # The generator's user message; with no behavior and no context the message is exactly the query.
  generator: str = "{behavior} Question: {query}{context}"
  chat_template: bool = True  # wrap the generator message in the tokenizer's chat template
  # The discriminator reads this prefix, then the response tokens; it scores the last token.
  disc: str = "{behavior} Question: {query}{context} Answer:"
  # How a record's optional "context" (the search result shown with the answer) enters {context}.
  context: str = " Search result: {context}"
  # The chat template's system message: "" keeps the template's own default (SmolLM2's costs ~20
  # tokens on every row); any other text replaces it.
  system: str = ""
