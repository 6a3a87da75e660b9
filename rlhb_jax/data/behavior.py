"""Behaviors as natural language: binning, verbalizing, the most preferred text, behavior swaps.

A record's behavior is a dict of counts ({"impressions": 120, "clicks": 14, "likes": 9, ...}). Each
configured type is smoothed as v = log(1 + x) and cut into N equal-width bins between the minimum
and maximum of v fitted on the training logs (RLHB.md section 2). The bins are written as one
sentence by templates held in `BehaviorConfig.types`; adding a behavior type or changing the
wording is a config change only.

Rates, not counts (`normalize_by_impressions`, default on): x = rate_scale * count / impressions for
every type but the denominator itself. Raw counts mostly measure how often an answer was shown:
in the simulator impressions spread over two orders of magnitude, so a wrong answer shown to a
thousand users out-"likes" a right one shown to twenty, and the text would describe popularity, not
quality. Rates in percent keep the log(1 + x) smoothing of the spec and make "many liked it" mean
the same for rare and popular answers. Set it to False for the spec's raw counts.

Bin rules: values below the fitted minimum go to bin 0, above the fitted maximum to bin N-1 (huge
counts clip); a constant column (max == min) puts every record in bin 0. Types missing from a record
count as 0.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
from collections.abc import Iterable, Mapping

import numpy as np

Template = tuple[str, str, tuple[str, ...]]  # (behavior type, polarity, phrases from low to high)
POLARITIES = ("positive", "negative", "neutral")


def _scale(verb: str) -> tuple[str, ...]:
  return tuple(f"{q} {verb}" for q in ("almost nobody", "few", "some", "many", "most"))


IMPRESSIONS: Template = ("impressions", "neutral", ())
CLICKS: Template = ("clicks", "positive", _scale("clicked a source"))
LIKES: Template = ("likes", "positive", _scale("liked it"))
DISLIKES: Template = ("dislikes", "negative", _scale("disliked it"))
REQUERIES: Template = ("requeries", "negative", _scale("asked again"))
# Ready-made entries for logs that record them; add them to `BehaviorConfig.types` to use them.
DWELL_SECONDS: Template = (
  "dwell_seconds",
  "positive",
  ("almost nobody read it", "few read it", "some read it", "many read it", "most read it closely"),
)
COPIES: Template = ("copies", "positive", _scale("copied it"))


@dataclasses.dataclass(frozen=True)
class BehaviorConfig:
  num_bins: int = 5  # N equal bins over log(1 + x)
  # (type, polarity, phrases): polarity is positive | negative | neutral; phrases go from the lowest
  # to the highest bin; with M phrases and N bins, bin b reads phrase round(b * (M-1) / (N-1)).
  # A type with no phrases is binned but not written (impressions: a denominator, not a verdict).
  types: tuple[Template, ...] = (IMPRESSIONS, CLICKS, LIKES, DISLIKES, REQUERIES)
  sentence: str = "Of the users who saw this answer, {clauses}."  # the clauses joined "a, b, and c"
  normalize_by_impressions: bool = True  # bin rate_scale * count / impressions instead of counts
  denominator: str = "impressions"  # the type rates divide by
  rate_scale: float = 100.0  # rates in percent before log(1 + x)
  real_valued: tuple[str, ...] = ("dwell_seconds",)  # types that may be non-integer (still >= 0)

  def __post_init__(self):
    if self.num_bins < 1:
      raise ValueError(f"config.behavior.num_bins={self.num_bins}: must be >= 1")
    names = [t[0] for t in self.types]
    if len(set(names)) != len(names):
      raise ValueError(f"config.behavior.types: duplicate names in {names}")
    for name, polarity, _ in self.types:
      if polarity not in POLARITIES:
        raise ValueError(
          f"config.behavior.types[{name!r}]: polarity {polarity!r} not in {POLARITIES}"
        )
    if self.normalize_by_impressions and self.denominator not in names:
      raise ValueError(f"config.behavior.denominator={self.denominator!r} is not a configured type")

  @property
  def names(self) -> tuple[str, ...]:
    return tuple(t[0] for t in self.types)


class Binner:
  """Fitted log(1 + x) bins per behavior type; `bin` returns int bins in `names` order, [K]."""

  def __init__(self, config: BehaviorConfig, lo: Mapping[str, float], hi: Mapping[str, float]):
    self.config = config
    self.names = config.names
    self.lo = np.array([lo[n] for n in self.names], np.float64)  # [K]
    self.hi = np.array([hi[n] for n in self.names], np.float64)  # [K]

  @classmethod
  def fit(cls, records: Iterable[Mapping], config: BehaviorConfig) -> Binner:
    """Min and max of the smoothed values over `records` (dicts with a "behavior"); one pass."""
    acc = RangeAccumulator(config)
    for record in records:
      acc.add(record["behavior"])
    return acc.binner()

  def values(self, behavior: Mapping[str, float]) -> np.ndarray:
    """Smoothed values log(1 + x), shape [K]."""
    return smooth(behavior, self.config)

  def bin(self, behavior: Mapping[str, float]) -> np.ndarray:
    """Bins of one behavior dict, int32 [K] in [0, N)."""
    return self.bin_values(self.values(behavior)[None])[0]

  def bin_many(self, behaviors: Iterable[Mapping[str, float]]) -> np.ndarray:
    """Bins of many behavior dicts, int32 [R, K]."""
    rows = [self.values(b) for b in behaviors]
    return self.bin_values(np.stack(rows) if rows else np.zeros((0, len(self.names))))

  def bin_values(self, v: np.ndarray) -> np.ndarray:
    """Bins of smoothed values v [..., K]: floor(N * (v - lo) / (hi - lo)) clipped to [0, N-1]."""
    n = self.config.num_bins
    width = self.hi - self.lo
    safe = np.where(width > 0, width, 1.0)
    b = np.floor(n * (v - self.lo) / safe)
    b = np.where(width > 0, b, 0.0)  # a constant column carries no information: bin 0
    return np.clip(b, 0, n - 1).astype(np.int32)

  def edges(self) -> dict[str, list[float]]:
    """The N + 1 bin edges of every type, in smoothed (log1p) units."""
    n = self.config.num_bins
    return {
      name: [float(x) for x in np.linspace(lo, hi, n + 1)]
      for name, lo, hi in zip(self.names, self.lo, self.hi, strict=True)
    }

  def save(self, path: str | pathlib.Path) -> None:
    """Writes the edges and the smoothing settings as JSON (e.g. DIR/bin_edges.json)."""
    cfg = self.config
    blob = {
      "num_bins": cfg.num_bins,
      "normalize_by_impressions": cfg.normalize_by_impressions,
      "denominator": cfg.denominator,
      "rate_scale": cfg.rate_scale,
      "edges": self.edges(),
    }
    pathlib.Path(path).write_text(json.dumps(blob, indent=1) + "\n")

  @classmethod
  def load(cls, path: str | pathlib.Path, config: BehaviorConfig) -> Binner:
    """Reads `save`'s file; the smoothing settings of the file win over `config`'s, so that the same
    text means the same thing as when the edges were fitted. Types must match."""
    blob = json.loads(pathlib.Path(path).read_text())
    edges = blob["edges"]
    if set(edges) != set(config.names):
      raise ValueError(f"{path}: bin edges for {sorted(edges)}, config has {sorted(config.names)}")
    config = dataclasses.replace(
      config,
      num_bins=int(blob["num_bins"]),
      normalize_by_impressions=bool(blob["normalize_by_impressions"]),
      denominator=blob["denominator"],
      rate_scale=float(blob["rate_scale"]),
    )
    return cls(config, {k: e[0] for k, e in edges.items()}, {k: e[-1] for k, e in edges.items()})


class RangeAccumulator:
  """Streaming min / max / sum of the smoothed values, for fitting a Binner in one pass."""

  def __init__(self, config: BehaviorConfig):
    self.config = config
    k = len(config.names)
    self.count = 0
    self.lo = [math.inf] * k
    self.hi = [-math.inf] * k
    self.total = [0.0] * k

  def add(self, behavior: Mapping[str, float]) -> list[float]:
    """Adds one behavior dict; returns its smoothed values [K] (plain floats: the hot loop)."""
    v = smooth_values(behavior, self.config)
    self.count += 1
    lo, hi, total = self.lo, self.hi, self.total
    for i, x in enumerate(v):
      if x < lo[i]:
        lo[i] = x
      if x > hi[i]:
        hi[i] = x
      total[i] += x
    return v

  def binner(self) -> Binner:
    if self.count == 0:
      raise ValueError("cannot fit bin edges on zero records")
    names = self.config.names
    return Binner(
      self.config, dict(zip(names, self.lo, strict=True)), dict(zip(names, self.hi, strict=True))
    )


def smooth_values(behavior: Mapping[str, float], config: BehaviorConfig) -> list[float]:
  """log(1 + x) of every configured type; x a count, or rate_scale * count / impressions."""
  denom = max(float(behavior.get(config.denominator) or 0), 1.0)
  scale = config.rate_scale / denom
  normalize = config.normalize_by_impressions
  out = []
  for name in config.names:
    x = float(behavior.get(name) or 0)
    if normalize and name != config.denominator:
      x *= scale
    out.append(math.log1p(x))
  return out


def smooth(behavior: Mapping[str, float], config: BehaviorConfig) -> np.ndarray:
  """`smooth_values` as a float64 array [K]."""
  return np.asarray(smooth_values(behavior, config), np.float64)


def phrase(template: Template, b: int, num_bins: int) -> str:
  phrases = template[2]
  if num_bins == 1:
    return phrases[0]
  return phrases[round(b * (len(phrases) - 1) / (num_bins - 1))]


def verbalize(bins: np.ndarray | list[int], config: BehaviorConfig) -> str:
  """One sentence for the bins [K] (in `config.names` order) from the templates."""
  clauses = [
    phrase(t, int(b), config.num_bins) for t, b in zip(config.types, bins, strict=True) if t[2]
  ]
  if len(clauses) > 2:
    joined = ", ".join(clauses[:-1]) + ", and " + clauses[-1]
  else:
    joined = " and ".join(clauses)
  text = config.sentence.format(clauses=joined)
  return text[:1].upper() + text[1:]


def most_preferred_bins(config: BehaviorConfig) -> np.ndarray:
  """Top bin of positive types, bin 0 of negative ones; neutral types (impressions) take the middle
  bin N // 2 (they are not written, and no exposure level is "preferred")."""
  top = config.num_bins - 1
  by_polarity = {"positive": top, "negative": 0, "neutral": config.num_bins // 2}
  return np.array([by_polarity[t[1]] for t in config.types], np.int32)


def most_preferred_text(config: BehaviorConfig) -> str:
  """The behavior text the generator gets at inference."""
  return verbalize(most_preferred_bins(config), config)


def least_preferred_bins(config: BehaviorConfig) -> np.ndarray:
  """The opposite of `most_preferred_bins`: bin 0 of positive types, top bin of negative ones."""
  top = config.num_bins - 1
  by_polarity = {"positive": 0, "negative": top, "neutral": config.num_bins // 2}
  return np.array([by_polarity[t[1]] for t in config.types], np.int32)


def least_preferred_text(config: BehaviorConfig) -> str:
  """The contrast behavior of `ppo.reward_contrast`."""
  return verbalize(least_preferred_bins(config), config)


def written_columns(config: BehaviorConfig) -> np.ndarray:
  """Indices of the types that appear in the text."""
  return np.array([i for i, t in enumerate(config.types) if t[2]], np.int64)


def swap_behaviors(
  bins: np.ndarray, rng: np.random.Generator, config: BehaviorConfig
) -> np.ndarray:
  """Behavior-swap negatives: row i gets another row's bins whose text differs from row i's.

  Rows are drawn from a random permutation; rows whose draw reads the same (same bins on the written
  types) redraw up to 8 times; a row that still matches (e.g. all rows read alike) gets one written
  type moved to another random bin, so the text always differs when N >= 2.

  Args:
    bins: int [R, K] bins of R records.
  Returns:
    int [R, K] swapped bins.
  """
  bins = np.asarray(bins)
  r = bins.shape[0]
  cols = written_columns(config)
  if r == 0 or cols.size == 0:
    return bins.copy()
  pick = rng.permutation(r)
  same = lambda p, rows: np.all(bins[p][:, cols] == bins[rows][:, cols], axis=1)
  rows = np.arange(r)
  bad = rows[same(pick, rows)]
  for _ in range(8):
    if bad.size == 0:
      break
    pick[bad] = rng.integers(0, r, size=bad.size)
    bad = bad[same(pick[bad], bad)]
  out = bins[pick].copy()
  n = config.num_bins
  if n >= 2:
    for i in bad:
      c = cols[rng.integers(cols.size)]
      out[i, c] = (out[i, c] + rng.integers(1, n)) % n
  return out


def verbalize_records(records: Iterable[Mapping], binner: Binner) -> list[str]:
  """Behavior text of every record, through the fitted `binner`."""
  bins = binner.bin_many(r["behavior"] for r in records)
  return [verbalize(b, binner.config) for b in bins]
