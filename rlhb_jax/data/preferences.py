"""Pairwise preferences (RLHF's data and DPO's pairs) and held-out splits."""

from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import Callable, Sequence

import numpy as np

from rlhb_jax.data.batches import search_result
from rlhb_jax.data.validate import read_json_objects, text_field


@dataclasses.dataclass(frozen=True)
class Pair:
  """Two answers to one query, the chosen one preferred (a DPO or reward-model example)."""

  TEXTS = ("query", "chosen", "rejected")  # the required fields of a JSONL line

  query: str
  chosen: str
  rejected: str
  context: str = ""


def read_preferences(
  path: str | pathlib.Path, context_fn: Callable[[str], str] | None = None
) -> list[Pair]:
  """Pairs from a JSONL of {"query", "chosen", "rejected", "context"?, "source"?}; a bad line is an
  error naming the file, the line and the field. Without "context", `context_fn(query)` gives it."""
  pairs = []
  for i, row in read_json_objects(path):
    query, chosen, rejected = (
      text_field(path, i, row, f, True) for f in ("query", "chosen", "rejected")
    )
    context = text_field(path, i, row, "context", False)
    source = text_field(path, i, row, "source", False)
    if context is None and context_fn is not None:
      context = context_fn(query)
    elif context is not None:
      context = search_result(context, source or "")
    pairs.append(Pair(query, chosen, rejected, context or ""))
  if not pairs:
    raise ValueError(f"{path}: no preference pairs")
  return pairs


def split_heldout(items: Sequence, fraction: float, seed: int) -> tuple[list, list]:
  """(train, held out): a seeded random `fraction` of `items` is held out."""
  order = np.random.default_rng([seed, 41]).permutation(len(items))
  n_out = int(round(fraction * len(items)))
  return [items[i] for i in order[n_out:]], [items[i] for i in order[:n_out]]
