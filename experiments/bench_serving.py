"""Feedback events per second and latency: old (http.server) vs new (FastAPI/uvicorn) HTTP layer.

    .venv/bin/python experiments/bench_serving.py [--seconds 4] [--repeats 2] [--pg-url URL]

Each (layer, store) pair serves `EchoPolicy` in this process; a separate client process runs
`--clients` threads, each on its own keep-alive connection, posting fresh `POST /v1/feedback`
events (each a new event id, so each is a committed insert) for `--seconds`, `--repeats` times,
interleaved with the other pairs; each run gets a fresh server and store (`--pg-url`: one). The
old layer is `rlhb_jax/serving/server.py` as of commit OLD_COMMIT (the last hand-written
`http.server` one), loaded from git. PostgreSQL: `--pg-url`, else a throwaway cluster started by
tests/pg.py. SQLite runs with the default `synchronous=FULL`. Prints one JSON line per run and a
Markdown table.
"""

from __future__ import annotations

import argparse
import http.client
import importlib.util
import json
import multiprocessing
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OLD_COMMIT = "7eef2c1"  # server.py before the move to FastAPI

sys.path.insert(0, REPO)
from rlhb_jax.serving import EchoPolicy, ServeConfig, make_server  # noqa: E402


def _old_make_server():
  source = subprocess.run(
    ["git", "show", f"{OLD_COMMIT}:rlhb_jax/serving/server.py"],
    cwd=REPO,
    check=True,
    capture_output=True,
    text=True,
  ).stdout
  path = os.path.join(tempfile.mkdtemp(), "old_server.py")
  with open(path, "w") as f:
    # Loaded outside its package: name the package its page is read from.
    f.write(source.replace("files(__package__)", "files('rlhb_jax.serving')"))
  spec = importlib.util.spec_from_file_location("rlhb_old_server", path)
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module  # its dataclasses look their module up
  spec.loader.exec_module(module)
  return module.make_server


def _client(port: int, rid: str, clients: int, seconds: float, tag: str, out) -> None:
  """Runs in its own process: `clients` threads posting events; sends back the latencies."""
  latencies: list[list[float]] = [[] for _ in range(clients)]
  errors = [0] * clients
  start = threading.Barrier(clients)

  def work(k: int) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    start.wait()
    deadline = time.perf_counter() + seconds
    i = 0
    while (now := time.perf_counter()) < deadline:
      body = json.dumps({"id": rid, "event_id": f"{tag}-{k}-{i}", "type": "likes"})
      conn.request("POST", "/v1/feedback", body, {"Content-Type": "application/json"})
      response = conn.getresponse()
      response.read()
      latencies[k].append(time.perf_counter() - now)
      errors[k] += response.status != 200
      i += 1
    conn.close()

  threads = [threading.Thread(target=work, args=(k,)) for k in range(clients)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  out.put(([x for per in latencies for x in per], sum(errors)))


def measure(make, store_url: str, workdir: str, args) -> tuple[list[float], int]:
  """One timed run against a fresh server: (sorted latencies in s, non-200 answers)."""
  config = ServeConfig(port=0, store_url=store_url, reload_poll_seconds=60)
  server = make(config, workdir, EchoPolicy()).start()
  try:
    (rid,) = server.store.add_responses(["q"], [None], ["a"], 0)
    context = multiprocessing.get_context("fork")  # no JAX in this process: fork is safe
    out = context.Queue()
    proc = context.Process(
      target=_client,
      args=(server.port, rid, args.clients, args.seconds, f"run-{time.time_ns()}", out),
    )
    proc.start()
    latencies, errors = out.get()
    proc.join()
  finally:
    server.shutdown()
  return sorted(latencies), errors


def _percentile_ms(latencies: list[float], q: float) -> float:
  return round(1000 * latencies[min(len(latencies) - 1, int(len(latencies) * q))], 2)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--seconds", type=float, default=4.0, help="length of one timed run")
  parser.add_argument("--repeats", type=int, default=2, help="runs per (layer, store), interleaved")
  parser.add_argument("--clients", type=int, default=8)
  parser.add_argument("--pg-url", default="", help="default: a throwaway cluster (tests/pg.py)")
  args = parser.parse_args()

  layers = {"http.server (old)": _old_make_server(), "FastAPI+uvicorn (new)": make_server}
  cluster = None
  if not args.pg_url:
    sys.path.insert(0, os.path.join(REPO, "tests"))
    import pg  # noqa: PLC0415

    reason = pg.available()
    if reason is None:
      cluster = pg.Cluster()
    else:
      print(f"PostgreSQL skipped: {reason}", file=sys.stderr)
  stores = ["sqlite"] + (["postgresql"] if args.pg_url or cluster else [])
  runs = {(layer, store): [] for layer in layers for store in stores}
  try:
    with tempfile.TemporaryDirectory() as tmp:
      # Interleaved, so a burst of load from other jobs on the machine spreads over all pairs.
      for repeat in range(args.repeats):
        for layer, store in runs:
          if store == "sqlite":
            url = os.path.join(tmp, f"{repeat}-{len(layer)}.db")  # a fresh file per run
          else:
            url = args.pg_url or cluster.new_database()
          latencies, errors = measure(layers[layer], url, tmp, args)
          runs[layer, store].append((latencies, errors))
          line = {"layer": layer, "store": store, "repeat": repeat, "events": len(latencies)}
          line |= {"events_per_s": round(len(latencies) / args.seconds, 1), "errors": errors}
          print(json.dumps(line), flush=True)
  finally:
    if cluster is not None:
      cluster.stop()
  print(
    f"\n{args.clients} clients, {args.repeats} x {args.seconds:g} s per pair; events/s: median "
    "(each run); latency percentiles over all runs' requests\n"
  )
  print("| HTTP layer | store | events/s | p50 ms | p99 ms | errors |")
  print("| --- | --- | ---: | ---: | ---: | ---: |")
  for (layer, store), results in runs.items():
    rates = [len(lat) / args.seconds for lat, _ in results]
    pooled = sorted(x for lat, _ in results for x in lat)
    each = ", ".join(f"{r:.0f}" for r in rates)
    print(
      f"| {layer} | {store} | {statistics.median(rates):.0f} ({each}) "
      f"| {_percentile_ms(pooled, 0.5)} | {_percentile_ms(pooled, 0.99)} "
      f"| {sum(e for _, e in results)} |"
    )


if __name__ == "__main__":
  main()
