"""mode=simulate: write simulated behavior logs and annotator preferences to the run directory.

Writes DIR/logs.jsonl (config.sim.num_records records) and DIR/preferences.jsonl
(config.sim.num_preferences pairs), seeded by config.seed.
"""

from __future__ import annotations

import collections
import pathlib
import time

from rlhb_jax.config import Config
from rlhb_jax.sim.simulator import Simulator, write_jsonl


def run(config: Config, workdir: pathlib.Path) -> dict:
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  start = time.perf_counter()
  sim = Simulator(config.sim, seed=config.seed)
  records = sim.records()
  prefs = sim.preferences()
  logs_path, prefs_path = workdir / "logs.jsonl", workdir / "preferences.jsonl"
  write_jsonl(logs_path, records)
  write_jsonl(prefs_path, prefs)
  seconds = time.perf_counter() - start

  shown: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
  for r in records:
    shown[r["meta"]["style"]].update(r["behavior"])
  like_rate = {s: c["likes"] / max(c["impressions"], 1) for s, c in sorted(shown.items())}
  summary = {
    "logs": str(logs_path),
    "preferences": str(prefs_path),
    "records": len(records),
    "preference_pairs": len(prefs),
    "train_queries": len(sim.queries("train")),
    "heldout_queries": len(sim.queries("heldout")),
    "like_rate_by_style": like_rate,
    "seconds": round(seconds, 2),
  }
  print(f"simulate: {len(records)} records -> {logs_path}")
  print(f"simulate: {len(prefs)} annotator pairs -> {prefs_path}")
  print(
    f"simulate: {summary['train_queries']} train / {summary['heldout_queries']} held-out queries"
  )
  print("simulate: like rate per impression by style:")
  styles = collections.Counter(r["meta"]["style"] for r in records)
  for style, rate in like_rate.items():
    print(f"  {style:16s} {rate:.3f}  ({styles[style]} records)")
  print(f"simulate: done in {seconds:.1f}s")
  return summary
