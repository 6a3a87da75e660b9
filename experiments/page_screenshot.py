"""The feedback page's screenshot with a model that reads: serves a run's generator and takes it.

  python experiments/page_screenshot.py --config configs/smollm2_sim.py \
      --workdir runs/real_model_v2/seed_0 --out docs/img/feedback_page.png

Starts `python -m rlhb_jax.main --config.mode=serve` on a free port, asks one question in Debian's
headless Chromium (Selenium, offline), likes the answer and writes the screenshot. The feedback goes
to the run's feedback.db like any other visitor's.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time

QUERY = "What is the capital of Norway?"


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--config", default="configs/smollm2_sim.py")
  ap.add_argument("--workdir", required=True)
  ap.add_argument("--out", default="docs/img/feedback_page.png")
  ap.add_argument("--query", default=QUERY)
  args = ap.parse_args()
  cmd = [sys.executable, "-m", "rlhb_jax.main", "--config", args.config, "--workdir"]
  cmd += [args.workdir, "--config.mode=serve", "--config.serve.port=0"]
  server = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  try:
    url = None
    for line in server.stdout:
      if m := re.search(r"listening on (http://\S+)", line):
        url = m.group(1).rstrip("/")
        break
    if url is None:
      raise SystemExit("the server did not start")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.support.ui import WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for arg in (
      "--headless=new",
      "--no-sandbox",
      "--disable-dev-shm-usage",
      "--window-size=900,640",
    ):
      options.add_argument(arg)
    os.environ["SE_OFFLINE"] = "true"
    driver = webdriver.Chrome(options=options, service=Service("/usr/bin/chromedriver"))
    try:
      driver.get(url + "/")
      driver.find_element("id", "query").send_keys(args.query)
      driver.find_element("id", "ask").click()
      WebDriverWait(driver, 300).until(lambda d: d.find_element("id", "answer").is_displayed())
      driver.find_element("id", "like").click()
      time.sleep(1.0)
      driver.save_screenshot(args.out)
      print("answer:", driver.find_element("id", "answer").text)
    finally:
      driver.quit()
  finally:
    server.terminate()
    server.wait(timeout=30)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
