"""The feedback page (`GET /`) in Debian's headless Chromium, driven by Selenium.

The server is the real one, serving the tiny model of the online tests (no training) with the
simulator's search results. Needs `chromium` and `chromium-driver` (`make test` installs them where
apt-get is usable); without them the module is skipped and says why. Selenium is pointed at
/usr/bin/chromedriver with SE_OFFLINE=true, so it never looks for a driver on the network.

`RLHB_PAGE_SCREENSHOT=docs/img/feedback_page.png` also writes the page's screenshot there.
"""

import collections
import importlib.util
import os
import pathlib
import shutil

import pytest

from rlhb_jax.serving import ServeConfig, make_server
from rlhb_jax.serving.policy import from_run

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

  def recording_add_event(response_id, event_id, type, value=1.0):
    new = add_event(response_id, event_id, type, value)
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
  assert _text(browser, "source") == "The capital of France is Paris."
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
  assert browser.find_element("tag name", "body").text == "The capital of France is Paris."
  browser.close()
  browser.switch_to.window(page)

  # Both likes reached the server with the same event id; the store kept the first only.
  assert sorted(server.sent) == sorted(
    [
      (row.id, f"{row.id}-impressions", "impressions", True),
      (row.id, f"{row.id}-likes", "likes", True),
      (row.id, f"{row.id}-likes", "likes", False),
      (row.id, f"{row.id}-clicks", "clicks", True),
    ]
  )
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
