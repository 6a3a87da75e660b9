"""The demo's showcase: the users' ceiling, the changed answers, and report.html in Chromium."""

import importlib.util
import os
import pathlib

import numpy as np
import pytest

from rlhb_jax.eval import showcase
from rlhb_jax.infra.report import plot_series
from rlhb_jax.sim import Simulator
from rlhb_jax.sim import policy as policy_lib

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"


def test_every_response_holds_whatever_the_logging_policy_writes():
  """Every response `render` writes (right answers, each style, citation and tone) is in the set
  the ceiling maximises over, so the ceiling is the best of them."""
  sim = Simulator()
  cfg = sim.config
  rng = np.random.default_rng(0)
  queries = sim.queries("heldout")
  for q in queries[::25]:
    fact = sim.lookup(q).fact
    every = set(policy_lib.every_response(sim.kb, fact))
    for _ in range(60):
      style = ("correct_concise", "correct_verbose", "correct_source", "off_topic", "refusal")[
        rng.integers(5)
      ]
      text = policy_lib.render(
        sim.kb, fact, style, rng, 0.4, 0.3, cfg.citations, cfg.fabricated_prob
      )
      assert text in every, (style, text)


def test_the_ceiling_is_the_best_like_rate_of_the_templates():
  sim = Simulator()
  rng = np.random.default_rng(1)
  for q in sim.queries("heldout")[::40]:
    top, best = sim.ceiling(q)
    assert sim.expected_rates(q, best)["like"] == pytest.approx(top)
    logged = [sim.respond(q, sim.sample_style(rng), rng) for _ in range(30)]
    assert max(sim.expected_rates(q, r)["like"] for r in logged) <= top + 1e-12
    # A correct answer citing the shown site is what these users like best.
    assert sim.features(q, best).answer == "correct" and sim.features(q, best).source


def test_changed_answers_are_ranked_by_the_like_rate_difference():
  def sample(q, a, b, la, lb):
    return {"query": q, "sft": a, "rlhb": b, "like": {"sft": la, "rlhb": lb}}

  samples = [
    sample("q1", "same", " same ", 0.4, 0.4),  # whitespace only: unchanged
    sample("q2", "a", "b", 0.4, 0.5),
    sample("q3", "a", "c", 0.4, 0.45),
    sample("q4", "a", "d", 0.4, 0.7),
    sample("q5", "a", "e", 0.5, 0.3),
    sample("q6", "a", "f", 0.5, 0.45),
  ]
  out = showcase.changed_answers(samples)
  assert out["changed"] == 5 and out["total"] == 6
  assert [g["query"] for g in out["gains"]] == ["q4", "q2"]
  assert out["loss"]["query"] == "q5" and out["loss"]["diff"] == pytest.approx(-0.2)
  none = showcase.changed_answers(samples[:1])
  assert none["changed"] == 0 and none["gains"] == [] and none["loss"] is None
  assert showcase.gap_closed(0.5, 0.4, 0.6) == pytest.approx(0.5)
  assert showcase.gap_closed(0.5, 0.6, 0.6) is None


def _chromium_missing() -> str | None:
  if importlib.util.find_spec("selenium") is None:
    return "selenium is not installed"
  for path in (CHROMIUM, CHROMEDRIVER):
    if not os.path.exists(path):
      return f"{path} is missing: apt-get install chromium chromium-driver (what `make test` runs)"
  return None


@pytest.mark.skipif(_chromium_missing() is not None, reason=str(_chromium_missing()))
def test_report_opens_in_chromium_with_every_image_loaded(tmp_path: pathlib.Path):
  from selenium import webdriver
  from selenium.webdriver.chrome.service import Service

  plots = [
    plot_series(tmp_path / f"p{i}.png", {"x": ([0, 1, 2], [i, 1, 0])}, f"plot {i}", "s", "v", 0.5)
    for i in range(3)
  ]
  d = {"query": "Q?", "sft": "a <b>", "rlhb": "c", "like_sft": 0.4, "like_rlhb": 0.6, "diff": 0.2}
  changed = {"changed": 1, "total": 2, "gains": [d], "loss": None}
  knob = {
    name: {"behavior": f"Users: {name}.", "like_rate": 0.5, "accuracy": 1.0, "grounded_rate": 0.0,
           "fabricated_rate": 0.0, "example": {"query": "Q?", "answer": "A."}}
    for name in ("most preferred", "least preferred", "mixed")
  }  # fmt: skip
  path = showcase.write_report(tmp_path / "report.html", "table", plots, changed, knob, "test")
  options = webdriver.ChromeOptions()
  options.binary_location = CHROMIUM
  for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage"):
    options.add_argument(arg)
  with pytest.MonkeyPatch.context() as env:
    env.setenv("SE_OFFLINE", "true")
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
  try:
    driver.get(path.as_uri())
    images = driver.execute_script(
      "return Array.from(document.images).map(i => [i.complete, i.naturalWidth]);"
    )
    assert len(images) == 3 and all(done and width > 0 for done, width in images), images
    text = driver.find_element("tag name", "body").text
    assert "a <b>" in text  # escaped, not parsed as markup
    assert "behavior knob" in text and "Users: mixed." in text
  finally:
    driver.quit()
