"""Users who check citations (sim.citations): grounded vs fabricated, and the old users kept."""

import dataclasses
import hashlib
import json
import pathlib
import types

import numpy as np
import pytest

from rlhb_jax import config as config_lib
from rlhb_jax.data.batches import record_context, search_result
from rlhb_jax.data.behavior import BehaviorConfig
from rlhb_jax.data.validate import FieldError, validate_record
from rlhb_jax.eval import evaluate
from rlhb_jax.sim import SimConfig, Simulator
from rlhb_jax.sim.kb import SITES
from rlhb_jax.sim.policy import render

FIXTURE = pathlib.Path(__file__).with_name("data") / "sim_citations_any.json"


@pytest.fixture(scope="module")
def sim():
  return Simulator(SimConfig(), seed=0)


def one_fact_per_domain(sim):
  facts = {}
  for q in sim.kb.queries("all"):
    facts.setdefault(q.fact.domain, q)
  return list(facts.values())


def test_every_fact_names_a_site_of_its_domain_fixed_across_seeds(sim):
  other = Simulator(SimConfig(), seed=5)
  for q in sim.kb.queries("all")[::50]:
    assert sim.source(q.text) in SITES[q.fact.domain]
    assert sim.source(q.text) == other.source(q.text)
  assert len({sim.source(q.text) for q in sim.kb.queries("all")}) > len(SITES)  # sites vary


def test_a_citation_of_the_shown_site_is_the_source_feature(sim):
  for q in one_fact_per_domain(sim):
    site, fact = sim.source(q.text), q.fact
    statement = fact.statement.format(answer=fact.answer)
    for text in (f"{statement} Source: {site}.", f"According to {site}, {statement}"):
      f = sim.features(q.text, text)
      assert (f.answer, f.source, f.fabricated) == ("correct", True, False), text
    bare = sim.features(q.text, statement)
    assert (bare.source, bare.fabricated) == (False, False)


def test_citing_another_site_is_fabricated_and_puts_off_the_thorough_users(sim):
  for q in one_fact_per_domain(sim):
    fact = q.fact
    statement = fact.statement.format(answer=fact.answer)
    others = [s for s in SITES[fact.domain] if s != sim.source(q.text)]
    bare = sim.segment_rates(q.text, statement)
    for text in (
      f"{statement} Source: {others[0]}.",
      f"{statement} Source: a textbook.",  # names no site at all
      f"{statement} Source: {sim.source(q.text)} and {others[0]}.",  # one of them is not shown
    ):
      f = sim.features(q.text, text)
      assert (f.answer, f.source, f.fabricated) == ("correct", False, True), text
      fake = sim.segment_rates(q.text, text)
      assert fake["thorough"]["like"] < bare["thorough"]["like"], text
      # A click on the citation leads nowhere: the user asks again.
      assert fake["thorough"]["requery"] >= fake["thorough"]["click"]
      assert fake["thorough"]["requery"] > bare["thorough"]["requery"]


def test_the_thorough_penalty_is_at_least_the_grounded_reward():
  seg = {s.name: s for s in SimConfig().segments}["thorough"]
  assert seg.fabricated >= seg.source > 0


def test_tone_keeps_its_effect_with_grounded_citations(sim):
  q = one_fact_per_domain(sim)[0]
  fact, site = q.fact, sim.source(q.text)
  plain = f"{fact.statement.format(answer=fact.answer)} Source: {site}."
  friendly, rude = "Great question! " + plain, plain + " Look it up next time."
  like = lambda t: sim.segment_rates(q.text, t)["friendly"]["like"]  # noqa: E731
  assert like(friendly) > like(plain) > like(rude)
  assert sim.features(q.text, friendly).source and sim.features(q.text, rude).source


def test_the_logging_policy_cites_mostly_the_shown_site(sim):
  records = sim.records(2000)
  cited = [sim.features(r["query"], r["response"]) for r in records]
  grounded = sum(f.source for f in cited)
  fabricated = sum(f.fabricated for f in cited)
  assert grounded > 0 and fabricated > 0
  assert 0.6 < grounded / (grounded + fabricated) < 0.9  # 1 - fabricated_prob = 0.75
  assert all(r["source"] == sim.source(r["query"]) for r in records)


@pytest.mark.parametrize(
  "answer",
  ["According to NIST, 3 hours is 180 minutes.", "According to a conversion table, 3 hours is 180 "
   "minutes."],
)  # fmt: skip
def test_sampled_counts_match_expected_rates_grounded_and_fabricated(answer):
  cfg = dataclasses.replace(
    SimConfig(), users=dataclasses.replace(SimConfig().users, noise_std=0.0)
  )
  sim = Simulator(cfg, seed=0)
  q = "Convert 3 hours to minutes."
  f = sim.features(q, answer)
  assert f.source or f.fabricated
  counts = sim.sample_behavior(q, answer, 200_000, np.random.default_rng(0))
  want = sim.expected_rates(q, answer)
  for key, name in [("click", "clicks"), ("like", "likes"), ("requery", "requeries")]:
    assert counts[name] / 200_000 == pytest.approx(want[key], abs=0.005), (answer, key)


def test_citations_any_reproduces_the_earlier_users_bit_for_bit():
  """Rates, sampled behavior, logs and preferences of the users before sim.citations existed,
  recorded from the code at tests/data/sim_citations_any.json's `made_by`."""
  old = json.loads(FIXTURE.read_text())
  sim = Simulator(SimConfig(citations="any"), seed=old["seed"])
  records, prefs = sim.records(len(old["rows"])), sim.preferences(len(old["pairs"]))
  assert hashlib.sha256(json.dumps(records).encode()).hexdigest() == old["records_sha256"]
  assert hashlib.sha256(json.dumps(prefs).encode()).hexdigest() == old["preferences_sha256"]
  for i, row in enumerate(old["rows"]):
    q, a = row["query"], row["response"]
    assert sim.expected_rates(q, a) == row["expected"]
    assert sim.segment_rates(q, a) == row["segments"]
    assert sim.sample_behavior(q, a, 500, np.random.default_rng(i)) == row["behavior"]
  for p, want in zip(prefs, old["pairs"], strict=True):
    assert sim.annotator_prob(p["query"], p["chosen"], p["rejected"]) == want["annotator"]
    assert sim.win_prob(p["query"], p["chosen"], p["rejected"]) == want["win"]
  # The grounded users read the same records differently (so the check above can fail).
  new = Simulator(SimConfig(), seed=old["seed"])
  assert any(new.expected_rates(r["query"], r["response"]) != r["expected"] for r in old["rows"])


def test_logs_with_and_without_source_load():
  behavior = BehaviorConfig()
  base = {"id": 1, "query": "q?", "response": "a.", "behavior": {n: 1 for n in behavior.names}}
  old = validate_record({**base, "context": "The answer is a."}, behavior)
  assert record_context(old) == "The answer is a."
  new = validate_record({**base, "context": "The answer is a.", "source": "NIST"}, behavior)
  assert (
    record_context(new) == search_result("The answer is a.", "NIST") == "NIST: The answer is a."
  )
  assert record_context(base) == ""
  with pytest.raises(FieldError) as err:
    validate_record({**base, "source": 3}, behavior)
  assert err.value.field == "source"


def test_simulated_logs_carry_the_source_and_the_prompt_shows_it(tmp_path):
  from rlhb_jax.run import Run

  cfg = config_lib.replace(config_lib.Config(), **{"sim.num_records": 50})
  run = Run(cfg, tmp_path).prepare("logs", "records", "bins")
  rec = run.records[0]
  assert rec["source"] == run.simulator.source(rec["query"])
  assert run.examples[0].context == f"{rec['source']}: {rec['context']}"


def test_evaluation_reports_grounded_and_fabricated_shares(sim):
  q = one_fact_per_domain(sim)[0]
  statement = q.fact.statement.format(answer=q.fact.answer)
  other = next(s for s in SITES[q.fact.domain] if s != sim.source(q.text))
  answers = [
    statement,
    f"{statement} Source: {sim.source(q.text)}.",
    f"{statement} Source: {other}.",
  ]
  out = evaluate.ground_truth(types.SimpleNamespace(simulator=sim), [q.text] * 3, answers)
  assert out["grounded_rate"] == pytest.approx(1 / 3)
  assert out["fabricated_rate"] == pytest.approx(1 / 3)
  assert out["accuracy"] == 1.0


def test_a_citation_style_unknown_is_refused():
  with pytest.raises(ValueError, match="citations"):
    SimConfig(citations="sometimes")


def test_render_cites_the_shown_site_unless_fabricating(sim):
  q = one_fact_per_domain(sim)[0]
  rng = np.random.default_rng(0)
  texts = [render(sim.kb, q.fact, "correct_source", rng, citations="grounded") for _ in range(20)]
  assert all(sim.features(q.text, t).source for t in texts)
  texts = [
    render(sim.kb, q.fact, "correct_source", rng, citations="grounded", fabricated_prob=1.0)
    for _ in range(20)
  ]
  assert all(sim.features(q.text, t).fabricated for t in texts)
