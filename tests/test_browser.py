"""The feedback page (`GET /`) in Debian's headless Chromium, driven by Selenium.

The server is the real one, serving the tiny model of the online tests with the simulator's search
results: without training, and (the last test) inside `mode=online` with `online.source=live`,
where the scripted person's clicks on the page are what a training round learns from. Needs
`chromium` and `chromium-driver` (`make test` installs them where apt-get is usable); without them
the module is skipped and says why. Selenium is pointed at /usr/bin/chromedriver with
SE_OFFLINE=true, so it never looks for a driver on the network.

`RLHB_PAGE_SCREENSHOT=docs/img/feedback_page.png` also writes the page's screenshot there.
"""

import collections
import importlib.util
import json
import os
import pathlib
import shutil

import pytest

from rlhb_jax.serving import EchoPolicy, ServeConfig, aggregate_records, make_server
from rlhb_jax.serving.policy import from_run
from rlhb_jax.sim import Simulator

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
QUERY = "What is the capital of France?"  # in the simulator's knowledge base


def _missing() -> str | None:
  if importlib.util.find_spec("selenium") is None:
    return "selenium is not installed (pip install -r requirements-dev.txt)"
  for path in (CHROMIUM, CHROMEDRIVER):
    if not os.access(path, os.X_OK):
      return f"{path} is missing: apt-get install chromium chromium-driver (what `make test` runs)"
  return None


MISSING = _missing()
pytestmark = pytest.mark.skipif(MISSING is not None, reason=str(MISSING))


@pytest.fixture(scope="module")
def server(tmp_path_factory):
  from test_online import tiny_online_config

  workdir = tmp_path_factory.mktemp("page")
  cfg = tiny_online_config(**{"sft.steps": 0, "disc.warmup_steps": 0})
  policy = from_run(cfg, workdir)
  server = make_server(ServeConfig(port=0, sqlite_synchronous="NORMAL"), workdir, policy).start()
  # Every event the page sends, with whether the store took it as new (the store deduplicates).
  server.sent = []
  add_event = server.store.add_event

  def recording_add_event(response_id, event_id, type, *args, **kwargs):
    new = add_event(response_id, event_id, type, *args, **kwargs)
    server.sent.append((response_id, event_id, type, new))
    return new

  server.store.add_event = recording_add_event
  yield server
  server.shutdown()


@pytest.fixture(scope="module")
def browser():
  from selenium import webdriver
  from selenium.webdriver.chrome.service import Service

  options = webdriver.ChromeOptions()
  options.binary_location = CHROMIUM
  for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=900,640"):
    options.add_argument(arg)
  with pytest.MonkeyPatch.context() as env:
    env.setenv("SE_OFFLINE", "true")
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
  yield driver
  driver.quit()


def _wait(driver, condition, timeout=60):
  from selenium.webdriver.support.ui import WebDriverWait

  return WebDriverWait(driver, timeout).until(condition)


def _text(driver, id_):
  return driver.find_element("id", id_).get_attribute("textContent")


def test_ask_like_twice_and_click_the_source_once(server, browser, tmp_path):
  browser.get(server.url + "/")
  _wait(browser, lambda d: _text(d, "events") == "0")
  browser.find_element("id", "query").send_keys(QUERY)
  browser.find_element("id", "ask").click()
  _wait(browser, lambda d: d.find_element("id", "answer").is_displayed())
  (row,) = server.store.read_new()[0].responses
  assert row.query == QUERY
  # The page shows what was stored and what the prompt held: the simulator's search result.
  assert _text(browser, "answer") == row.response
  assert _text(browser, "step") == str(row.model_step) == "0"
  # The search result's site, then its sentence, as search pages show them.
  site = Simulator().source(QUERY)
  assert site and _text(browser, "source") == f"{site}: The capital of France is Paris."
  assert row.behavior in _text(browser, "condition")
  assert "this search result" in _text(browser, "condition")
  _wait(browser, lambda d: len(server.sent) == 1)  # the impression, once the answer was shown

  page = browser.current_window_handle
  browser.find_element("id", "like").click()
  browser.find_element("id", "like").click()
  browser.find_element("id", "source").click()  # opens the search result in a new tab
  _wait(browser, lambda d: len(server.sent) == 4 and _text(d, "events") == "3")
  new_tab = next(h for h in browser.window_handles if h != page)
  browser.switch_to.window(new_tab)
  assert browser.find_element("tag name", "body").text == f"{site}: The capital of France is Paris."
  browser.close()
  browser.switch_to.window(page)

  # Both likes reached the server with the same event id; the store kept the first only.
  assert sorted((rid, kind, new) for rid, _, kind, new in server.sent) == sorted(
    [
      (row.id, "impressions", True),
      (row.id, "likes", True),
      (row.id, "likes", False),
      (row.id, "clicks", True),
    ]
  )
  likes = [event_id for _, event_id, kind, _ in server.sent if kind == "likes"]
  assert likes[0] == likes[1] and len({e for _, e, _, _ in server.sent}) == 3
  # The ids are random, 128 bits a page's answer: nothing anyone else could guess from the id.
  nonces = {event_id.split("-")[0] for _, event_id, _, _ in server.sent}
  assert len(nonces) == 1 and len(nonces.pop()) == 32
  assert not any(row.id in event_id for _, event_id, _, _ in server.sent)
  events = server.store.read_new()[0].events
  assert collections.Counter((e.response_id, e.type) for e in events) == {
    (row.id, "impressions"): 1,
    (row.id, "likes"): 1,
    (row.id, "clicks"): 1,
  }
  assert _text(browser, "events") == "3"
  assert browser.find_element("id", "like").get_attribute("aria-pressed") == "true"

  shot = tmp_path / "feedback_page.png"
  assert browser.save_screenshot(str(shot))
  assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  if target := os.environ.get("RLHB_PAGE_SCREENSHOT"):
    shutil.copy(shot, pathlib.Path(target))


@pytest.mark.parametrize(
  "query, status, words",
  [("", 422, "must not be empty"), ("q" * (2 << 20), 413, "too long")],
  ids=["empty", "2MB"],
)
def test_bad_input_gets_a_readable_message_and_the_documented_status(
  server, browser, query, status, words
):
  browser.get(server.url + "/")
  _wait(browser, lambda d: _text(d, "events") != "?")
  before = server.store.counts()
  # Typing 2 MB into the box would take minutes; the page reads the box's value either way.
  browser.execute_script("document.getElementById('query').value = arguments[0]", query)
  browser.find_element("id", "ask").click()
  _wait(browser, lambda d: d.find_element("id", "message").get_attribute("data-status"))
  message = browser.find_element("id", "message")
  assert message.get_attribute("data-status") == str(status)
  assert words in message.text and f"(HTTP {status})" in message.text
  assert message.is_displayed() and not browser.find_element("id", "answer").is_displayed()
  assert server.store.counts() == before


def test_the_page_votes_as_its_own_session(browser, tmp_path):
  """serve.auth=keys_or_session: the page gets an HttpOnly session and votes as it, one vote per
  answer: a dislike replaces the like, the like again replaces the dislike (a new random event
  id: issue #39), and a second click on it is a duplicate. The young-session rule is off here."""
  config = ServeConfig(
    port=0,
    auth="keys_or_session",
    sqlite_synchronous="NORMAL",
    young_seconds=0,
    young_impressions=0,
  )
  server = make_server(config, tmp_path, EchoPolicy()).start()
  try:
    browser.delete_all_cookies()
    browser.get(server.url + "/")
    _wait(browser, lambda d: _text(d, "events") == "0")
    cookie = browser.get_cookie("rlhb_session")
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"
    assert "rlhb_session" not in browser.execute_script("return document.cookie")
    browser.find_element("id", "query").send_keys(QUERY)
    browser.find_element("id", "ask").click()
    _wait(browser, lambda d: _text(d, "events") == "1")  # the impression
    for button, events in (("like", "2"), ("dislike", "3"), ("like", "4"), ("like", "4")):
      browser.find_element("id", button).click()
      _wait(browser, lambda d, n=events: _text(d, "events") == n)
    _wait(browser, lambda d: "Already recorded" in _text(d, "message"))
    feed = server.store.read_new()[0]
    (row,) = feed.responses
    assert row.identity.startswith("session:")
    assert {e.identity for e in feed.events} == {row.identity}
    (record,) = aggregate_records(feed.events, ("impressions", "likes", "dislikes"))
    assert record["behavior"] == {"impressions": 1, "likes": 1, "dislikes": 0}
    assert len({e.event_id for e in feed.events}) == 4
  finally:
    server.shutdown()


# Records what the page posts to /v1/feedback (the page calls the global fetch at each call).
RECORD_SENT = """
window.sent = [];
const fetch0 = window.fetch;
window.fetch = (path, options) => {
  if (path === "/v1/feedback") window.sent.push(JSON.parse(options.body));
  return fetch0(path, options);
};
"""


def _ask(driver, query, events_after):
  """Types `query`, asks, and waits until the answer's impression is stored."""
  box = driver.find_element("id", "query")
  box.clear()
  box.send_keys(query)
  driver.find_element("id", "ask").click()
  _wait(driver, lambda d: _text(d, "events") == str(events_after))
  return _text(driver, "answer"), _text(driver, "step")


def _press(driver, id_, events_after):
  driver.find_element("id", id_).click()
  _wait(driver, lambda d: _text(d, "events") == str(events_after))


@pytest.mark.slow
def test_a_person_on_the_page_reaches_a_training_round_and_sees_its_model(browser, tmp_path):
  """mode=online, online.source=live, the tiny model, the page's sessions (serve.auth=
  keys_or_session), a person scripted in Chromium. Round 0: the person asks two questions, likes
  the first (twice) and clicks its source, dislikes the second and asks again differently; the
  round's records hold exactly the events the page sent, and one training round runs on them.
  Round 1: the page's answers come from the model that round trained (the step it shows)."""
  from test_online import tiny_online_config

  from rlhb_jax.jobs import online
  from rlhb_jax.serving import open_store

  cfg = tiny_online_config(
    **{
      "sft.steps": 0,
      "disc.warmup_steps": 0,
      "online.source": "live",
      "online.rounds": 2,
      "online.min_records": 2,
      "online.poll_seconds": 0.2,
      "serve.port": 0,
      "serve.auth": "keys_or_session",
      "serve.young_seconds": 0.0,  # the person's fresh session votes at once (issue #39's rule off)
      "serve.young_impressions": 0,
    }
  )
  second = "What is the capital of Albania?"
  sent, shown = {}, {}
  page = []

  def person(url, r):
    if r == 0:
      browser.delete_all_cookies()
      browser.get(url + "/")
      _wait(browser, lambda d: _text(d, "events") == "0")
      browser.execute_script(RECORD_SENT)
      page.append(browser.current_window_handle)
      shown[r] = _ask(browser, QUERY, 1)
      _press(browser, "like", 2)
      _press(browser, "like", 2)  # a double click: the same event id, stored once
      browser.find_element("id", "source").click()  # opens the search result in a new tab
      _wait(browser, lambda d: _text(d, "events") == "3" and len(d.window_handles) == 2)
      browser.switch_to.window(next(h for h in browser.window_handles if h != page[0]))
      browser.close()
      browser.switch_to.window(page[0])
      _ask(browser, second, 4)
      _press(browser, "dislike", 5)
      _press(browser, "reask", 6)
    else:  # the same page, still open: the next answers come from the model round 0 trained
      shown[r] = _ask(browser, QUERY, 7)
      _wait(browser, lambda d: _text(d, "serving-step") == shown[r][1])
      _ask(browser, second, 8)
      _press(browser, "like", 9)
    sent[r] = browser.execute_script("return window.sent.splice(0)")

  summary = online.run(cfg, tmp_path, clients=person)

  rounds = summary["rounds"]
  assert [e["records"] for e in rounds] == [2, 2]
  assert [e["model_step"] for e in rounds] == [0, 1]  # one RLHB step a round
  assert shown[0][1] == "0" and shown[1][1] == "1"  # the page showed the new step
  metrics = [json.loads(x) for x in (tmp_path / "online.jsonl").read_text().splitlines()]
  assert [(m["step"], m["round"]) for m in metrics] == [(1, 0), (2, 1)]

  with open_store("", tmp_path) as store:
    feed = store.read_new()[0]
  step_of = {row.id: row.model_step for row in feed.responses}
  logged = {
    r: [
      json.loads(x) for x in (tmp_path / "online" / f"round_{r:03d}.jsonl").read_text().splitlines()
    ]
    for r in (0, 1)
  }
  for r, records in logged.items():
    # What the page sent, each event id once (the store answered the repeat as a duplicate).
    unique = {e["event_id"]: e for e in sent[r]}
    want = collections.defaultdict(collections.Counter)
    for e in unique.values():
      want[e["id"]][e["type"]] += 1
    got = {
      rec["id"]: collections.Counter({k: v for k, v in rec["behavior"].items() if v})
      for rec in records
    }
    assert got == want  # none lost, none invented
    assert {rec["id"]: rec["meta"]["events"] for rec in records} == {
      i: sum(c.values()) for i, c in want.items()
    }
    assert {step_of[i] for i in want} == {r}  # answered by the model of round r
  assert len(sent[0]) == 7 and len({e["event_id"] for e in sent[0]}) == 6
  assert sorted(e["type"] for e in {e["event_id"]: e for e in sent[0]}.values()) == sorted(
    ["impressions", "likes", "clicks", "impressions", "dislikes", "requeries"]
  )
  # The liked answer is logged with the search result the page showed beside it.
  (liked,) = [rec for rec in logged[0] if rec["behavior"]["likes"]]
  assert liked["query"] == QUERY and liked["response"] == shown[0][0]
  assert liked["source"] == Simulator().source(QUERY)
  assert {e.identity for e in feed.events} == {feed.responses[0].identity}  # the page's session
  assert json.loads((tmp_path / "models" / "online_actor.json").read_text()) == {
    "step": 2,
    "round": 2,
  }
