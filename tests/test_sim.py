"""The simulated online search environment (rlhb_jax/sim)."""

import dataclasses
import json
import time

import numpy as np
import pytest

from rlhb_jax import config as config_lib
from rlhb_jax.jobs import simulate
from rlhb_jax.sim import STYLES, SimConfig, Simulator


@pytest.fixture(scope="module")
def sim():
  return Simulator(SimConfig(), seed=0)


def test_knowledge_base_size_domains_and_split(sim):
  assert len(sim.kb.domains) >= 5
  train, heldout = sim.queries("train"), sim.queries("heldout")
  assert len(set(train + heldout)) >= 1000 and len(heldout) >= 200
  # Split by fact: no held-out query shares its answer's fact with a training query.
  fact = lambda q: sim.lookup(q).fact.fact_id
  assert not {fact(q) for q in train} & {fact(q) for q in heldout}
  assert {sim.lookup(q).fact.domain for q in heldout} == set(sim.kb.domains)
  assert all(len(f.phrasings) >= 3 for f in sim.kb.facts)
  # The split does not depend on the run's seed.
  assert Simulator(SimConfig(), seed=5).queries("heldout") == heldout


def test_judge_agrees_with_the_logging_policy_on_every_fact(sim):
  rng = np.random.default_rng(0)
  want = {"wrong": "wrong", "off_topic": "none", "refusal": "none"}
  for q in sim.kb.queries("all"):
    for style in STYLES:
      response = sim.respond(q.text, style, rng)
      assert sim.features(q.text, response).answer == want.get(style, "correct"), (q.text, response)
      assert len(response.split()) <= 30


def test_determinism(sim):
  other = Simulator(SimConfig(), seed=0)
  assert json.dumps(sim.records(300)) == json.dumps(other.records(300))
  assert sim.preferences(50) == other.preferences(50)
  assert sim.records(300) != Simulator(SimConfig(), seed=1).records(300)


def test_records_follow_the_log_format(sim):
  records = sim.records(500)
  assert len({(r["query"], r["response"]) for r in records}) == 500  # aggregated per pair
  for r in records:
    b = r["behavior"]
    assert set(b) == {"impressions", "clicks", "likes", "dislikes", "requeries"}
    assert b["likes"] + b["dislikes"] <= b["impressions"]
    assert r["meta"]["style"] in STYLES and isinstance(r["meta"]["correct"], bool)
    assert r["meta"]["correct"] == r["meta"]["style"].startswith("correct")


def test_every_segment_likes_correct_answers_more_than_wrong_ones(sim):
  rng = np.random.default_rng(1)
  for q in sim.queries("train")[::40]:
    rates = {
      style: sim.segment_rates(q, sim.respond(q, style, rng))
      for style in ("correct_concise", "correct_verbose", "correct_source", "wrong")
    }
    for seg in (g.name for g in sim.config.segments):
      worst_correct = min(rates[s][seg]["like"] for s in rates if s != "wrong")
      assert worst_correct > rates["wrong"][seg]["like"], (q, seg)


def test_like_rates_separate_good_and_bad_styles(sim):
  records = sim.records(3000)
  like = {}

  def rate(rows):
    return sum(b["likes"] for b in rows) / sum(b["impressions"] for b in rows)

  for style in STYLES:
    like[style] = rate([r["behavior"] for r in records if r["meta"]["style"] == style])
  sourced = [r for r in records if r["meta"]["style"] == "correct_source"]
  grounded = rate(
    [r["behavior"] for r in sourced if sim.features(r["query"], r["response"]).source]
  )
  fabricated = rate(
    [r["behavior"] for r in sourced if sim.features(r["query"], r["response"]).fabricated]
  )
  assert 0.35 <= like["correct_concise"] <= 0.6
  assert grounded > like["correct_concise"] > like["correct_verbose"]
  assert grounded > like["correct_source"] > fabricated
  assert max(like["wrong"], like["off_topic"], like["refusal"]) < 0.03


def test_ground_truth_is_robust_to_garbled_text(sim):
  q = "What is the capital of Peru?"
  good = sim.expected_rates(q, "Lima.")
  assert good["like"] > 0.35
  for junk in ["", "   ", "Lima Lima Lima Lima Lima Lima", "#$%@!! ^^ &&", "The capital of Peru is",
               "Lima or Quito.", "qwerty zxcv asdf", "\u00e9\u00e8 \u6f22\u5b57"]:  # fmt: skip
    r = sim.expected_rates(q, junk)
    assert r["like"] < good["like"] / 3 and r["requery"] > good["requery"], junk
    assert all(0.0 <= v <= 1.0 for v in r.values())
  assert sim.win_prob(q, "Lima.", "Quito.") > 0.9
  assert sim.win_prob(q, "Lima.", "Lima.") == pytest.approx(0.5)
  assert sim.win_prob(q, "Lima.", "x") + sim.win_prob(q, "x", "Lima.") == pytest.approx(1.0)
  with pytest.raises(KeyError, match="not in the simulator"):
    sim.expected_rates("Who won the cup?", "Lima.")


def test_sampled_counts_match_expected_rates():
  cfg = dataclasses.replace(
    SimConfig(), users=dataclasses.replace(SimConfig().users, noise_std=0.0)
  )
  sim = Simulator(cfg, seed=0)
  q, a = "Convert 3 hours to minutes.", "According to a conversion table, 3 hours is 180 minutes."
  counts = sim.sample_behavior(q, a, 200_000, np.random.default_rng(0))
  want = sim.expected_rates(q, a)
  for key, name in [
    ("click", "clicks"),
    ("like", "likes"),
    ("dislike", "dislikes"),
    ("requery", "requeries"),
  ]:
    assert counts[name] / 200_000 == pytest.approx(want[key], abs=0.005)


def test_annotators_disagree_with_users_on_a_measurable_share(sim):
  rng = np.random.default_rng(2)
  train = sim.queries("train")
  disagree = total = 0
  for _ in range(1500):
    q = train[rng.integers(len(train))]
    a, b = (sim.respond(q, sim.sample_style(rng), rng) for _ in range(2))
    user, ann = sim.win_prob(q, a, b), sim.annotator_prob(q, a, b)
    if a == b or abs(user - 0.5) < 1e-9 or abs(ann - 0.5) < 1e-9:
      continue
    total += 1
    disagree += (user > 0.5) != (ann > 0.5)
  assert 0.15 <= disagree / total <= 0.6
  # The bias is the configured one: annotators choose the longer of two right answers.
  q = "What is the capital of Peru?"
  long = "Here is the answer. The capital of Peru is Lima. It is home to the national government."
  assert sim.annotator_prob(q, long, "Lima.") > 0.9 and sim.win_prob(q, long, "Lima.") < 0.5


def test_drift_changes_the_segment_mix():
  cfg = dataclasses.replace(SimConfig(), drift_round=3, num_rounds=6)
  sim = Simulator(cfg, seed=0)
  np.testing.assert_allclose(sim.segment_shares(2), [0.5, 0.3, 0.2])
  np.testing.assert_allclose(sim.segment_shares(3), [0.2, 0.3, 0.5])
  q = "What is 6 times 7?"
  rude = "Obviously, 6 times 7 is 42. Look it up next time."
  assert (
    sim.expected_rates(q, rude, round=5)["like"]
    < sim.expected_rates(q, rude, round=0)["like"] - 0.05
  )
  records = sim.records(120)
  assert sorted({r["meta"]["round"] for r in records}) == list(range(6))
  assert records[-1]["timestamp"].startswith("2026-11-06")


def test_simulate_job_writes_20k_records_quickly(tmp_path):
  cfg = config_lib.replace(
    config_lib.Config(), **{"sim.num_records": 20_000, "sim.num_preferences": 500}
  )
  start = time.perf_counter()
  summary = simulate.run(cfg, tmp_path)
  assert time.perf_counter() - start < 60
  lines = (tmp_path / "logs.jsonl").read_text().splitlines()
  assert len(lines) == summary["records"] == 20_000
  prefs = [json.loads(x) for x in (tmp_path / "preferences.jsonl").read_text().splitlines()]
  assert len(prefs) == 500 and all({"query", "chosen", "rejected"} <= set(p) for p in prefs)
  assert all(p["chosen"] != p["rejected"] for p in prefs)
