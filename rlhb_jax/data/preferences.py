"""Pairwise preferences (RLHF's data and DPO's pairs) and held-out splits."""

from __future__ import annotations

import dataclasses
import json
import pathlib
from collections.abc import Callable, Sequence

import numpy as np

from rlhb_jax.data.validate import BadRecordError


@dataclasses.dataclass(frozen=True)
class Pair:
  query: str
  chosen: str
  rejected: str
  context: str = ""


def read_preferences(
  path: str | pathlib.Path, context_fn: Callable[[str], str] | None = None
) -> list[Pair]:
  """Pairs from a JSONL of {"query", "chosen", "rejected", "context"?}; a bad line is an error
  naming the file, the line and the field."""
  pairs = []
  with open(path, encoding="utf-8") as f:
    for i, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        row = json.loads(line)
      except json.JSONDecodeError as e:
        raise BadRecordError(str(path), i, "<line>", "json", f"invalid JSON: {e.msg}") from None
      if not isinstance(row, dict):
        raise BadRecordError(str(path), i, "<line>", "type", "expected a JSON object")
      for field in ("query", "chosen", "rejected"):
        value = row.get(field)
        if not isinstance(value, str) or not value.strip():
          kind = "missing" if value is None else "type"
          raise BadRecordError(str(path), i, field, kind, "expected a non-empty string")
      context = row.get("context")
      if context is not None and not isinstance(context, str):
        raise BadRecordError(str(path), i, "context", "type", "expected a string")
      if context is None and context_fn is not None:
        context = context_fn(row["query"])
      pairs.append(Pair(row["query"], row["chosen"], row["rejected"], context or ""))
  if not pairs:
    raise ValueError(f"{path}: no preference pairs")
  return pairs


def split_heldout(items: Sequence, fraction: float, seed: int) -> tuple[list, list]:
  """(train, held out): a seeded random `fraction` of `items` is held out."""
  order = np.random.default_rng([seed, 41]).permutation(len(items))
  n_out = int(round(fraction * len(items)))
  return [items[i] for i in order[n_out:]], [items[i] for i in order[:n_out]]
