"""Binning, verbalizing, the most preferred text and behavior swaps (rlhb_jax/data/behavior.py)."""

import dataclasses
import math

import numpy as np
import pytest

from rlhb_jax.data import behavior

RAW = dataclasses.replace(
  behavior.BehaviorConfig(), normalize_by_impressions=False
)  # the spec's counts


def _records(rows, names=("impressions", "clicks", "likes", "dislikes", "requeries")):
  return [{"behavior": dict(zip(names, r, strict=True))} for r in rows]


def test_equal_width_log1p_bins_on_counts():
  recs = _records([(0, 0, 0, 0, 0), (math.e**5 - 1, 1, 2, 3, 4)])
  binner = behavior.Binner.fit(recs, RAW)
  edges = binner.edges()["impressions"]
  np.testing.assert_allclose(edges, [0, 1, 2, 3, 4, 5])
  # log1p(x) for x = e^k - 1 is k: the bin is floor(k) (top edge included in the last bin).
  for k, want in [(0, 0), (0.5, 0), (1.0, 1), (2.99, 2), (4.2, 4), (5.0, 4)]:
    assert binner.bin({"impressions": math.e**k - 1})[0] == want


def test_zeros_huge_counts_and_constant_columns():
  recs = _records([(10, 0, 0, 5, 3), (100, 0, 40, 5, 9), (1000, 0, 80, 5, 1)])
  binner = behavior.Binner.fit(recs, RAW)
  # clicks are all zero and dislikes constant at 5: every record, and any new value, is bin 0.
  bins = binner.bin_many(r["behavior"] for r in recs)
  assert (bins[:, 1] == 0).all() and (bins[:, 3] == 0).all()
  assert binner.bin({"clicks": 7, "dislikes": 1000})[[1, 3]].tolist() == [0, 0]
  # Huge counts clip to the top bin, counts below the fitted minimum to bin 0; absent types are 0.
  huge = binner.bin({"impressions": 10**15, "likes": 10**12, "requeries": 10**9})
  assert huge[[0, 2, 4]].tolist() == [4, 4, 4]
  assert binner.bin({"impressions": 0})[0] == 0
  assert bins[:, 0].tolist() == [0, 2, 4]


def test_rates_are_binned_when_normalized():
  cfg = behavior.BehaviorConfig()  # normalize_by_impressions=True
  recs = _records([(10, 0, 1, 0, 0), (1000, 0, 100, 0, 0), (20, 0, 0, 0, 0), (10, 0, 10, 0, 0)])
  binner = behavior.Binner.fit(recs, cfg)
  likes = binner.bin_many(r["behavior"] for r in recs)[:, 2]
  # 1/10 and 100/1000 are the same rate, hence the same bin, whatever the popularity.
  assert likes[0] == likes[1] and likes[2] == 0 and likes[3] == 4
  np.testing.assert_allclose(binner.edges()["likes"][-1], math.log1p(100.0))


def test_save_load_round_trip(tmp_path):
  recs = _records([(5, 1, 2, 0, 1), (500, 40, 100, 20, 9), (50, 3, 0, 30, 2)])
  binner = behavior.Binner.fit(recs, behavior.BehaviorConfig())
  binner.save(tmp_path / "bin_edges.json")
  # Loading with a config that says otherwise keeps the file's smoothing: same text, same meaning.
  other = dataclasses.replace(
    behavior.BehaviorConfig(), normalize_by_impressions=False, rate_scale=1.0
  )
  loaded = behavior.Binner.load(tmp_path / "bin_edges.json", other)
  probe = [
    {"impressions": 77, "clicks": 5, "likes": 20, "dislikes": 3, "requeries": 1},
    *[r["behavior"] for r in recs],
  ]
  np.testing.assert_array_equal(loaded.bin_many(probe), binner.bin_many(probe))
  with pytest.raises(ValueError, match="bin edges"):
    behavior.Binner.load(
      tmp_path / "bin_edges.json",
      dataclasses.replace(behavior.BehaviorConfig(), types=(behavior.IMPRESSIONS, behavior.LIKES)),
    )


def test_verbalize_known_inputs():
  cfg = behavior.BehaviorConfig()
  assert behavior.verbalize([2, 4, 3, 0, 1], cfg) == (
    "Of the users who saw this answer, most clicked a source, many liked it, "
    "almost nobody disliked it, and few asked again."
  )
  assert behavior.most_preferred_text(cfg) == (
    "Of the users who saw this answer, most clicked a source, most liked it, "
    "almost nobody disliked it, and almost nobody asked again."
  )
  assert behavior.most_preferred_bins(cfg).tolist() == [
    2,
    4,
    4,
    0,
    0,
  ]  # impressions: neutral, middle bin
  # Fewer bins reuse the 5 phrases: bin b reads phrase round(b * 4 / (N - 1)).
  three = dataclasses.replace(cfg, num_bins=3)
  assert behavior.verbalize([0, 0, 1, 2, 0], three) == (
    "Of the users who saw this answer, almost nobody clicked a source, some liked it, "
    "most disliked it, and almost nobody asked again."
  )
  assert 15 <= len(behavior.most_preferred_text(cfg).split()) <= 25


def test_new_behavior_type_is_a_config_change():
  shares = ("shares", "positive", ("nobody shared it", "a few shared it", "many shared it"))
  cfg = dataclasses.replace(
    behavior.BehaviorConfig(),
    num_bins=3,
    types=(behavior.IMPRESSIONS, behavior.LIKES, shares),
    sentence="Users: {clauses}.",
  )
  recs = _records(
    [(100, 50, 0), (100, 10, 5), (100, 0, 60)], names=("impressions", "likes", "shares")
  )
  binner = behavior.Binner.fit(recs, cfg)
  texts = behavior.verbalize_records(recs, binner)
  assert texts == [
    "Users: most liked it and nobody shared it.",
    "Users: some liked it and a few shared it.",
    "Users: almost nobody liked it and many shared it.",
  ]
  assert behavior.most_preferred_text(cfg) == "Users: most liked it and many shared it."


def test_swap_changes_the_text_where_possible():
  cfg = behavior.BehaviorConfig()
  rng = np.random.default_rng(0)
  bins = rng.integers(0, 5, size=(64, 5))
  bins[:40] = bins[0]  # many rows read alike
  swapped = behavior.swap_behaviors(bins, rng, cfg)
  text = lambda b: behavior.verbalize(b, cfg)
  assert all(text(a) != text(b) for a, b in zip(bins, swapped, strict=True))
  # Every swapped row but the forced ones is another record's behavior.
  rows = {tuple(r) for r in bins.tolist()}
  assert sum(tuple(r) in rows for r in swapped.tolist()) >= 60
  # All rows identical: no other record differs, so one written type moves to another bin.
  same = np.tile([1, 2, 3, 2, 1], (8, 1))
  out = behavior.swap_behaviors(same, rng, cfg)
  assert all(text(a) != text(b) for a, b in zip(same, out, strict=True))
  assert (out[:, 0] == 1).all()  # impressions is not written, never the one changed


def test_config_errors():
  with pytest.raises(ValueError, match="polarity"):
    behavior.BehaviorConfig(types=(("likes", "good", ()),))
  with pytest.raises(ValueError, match="denominator"):
    behavior.BehaviorConfig(types=(behavior.LIKES,))
