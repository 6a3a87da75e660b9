"""mode=inspect_logs: stream a behavior log once, validate it, fit bin edges, and report.

Reads config.data.path (JSONL, Parquet or a TFDS dir) in bounded memory: exact counts, min / max /
mean and bin edges over every record; quantiles, bin shares and sample texts from a seeded reservoir
sample of `_RESERVOIR` records. Writes DIR/inspect.json, DIR/bin_edges.json and, for bad records in
quarantine mode, DIR/quarantine.jsonl. With data.on_error=fail the first bad record raises
`BadRecordError`.

When the run has a feedback store (`serve.store_url`, or DIR/feedback.db), its identified events
are screened too (`serving.ingest`): identities whose volume or agreement is anomalous, and bursts
of new identities on one answer or from one address, are reported in DIR/inspect_identities.json,
and their events quarantined to DIR/quarantine_identities.jsonl and counted (with
`serve.ingest.quarantine`), like bad lines. The store's events are read whole.
"""

from __future__ import annotations

import json
import math
import pathlib
import random
import resource
import time

import numpy as np

from rlhb_jax.config import Config
from rlhb_jax.data.behavior import RangeAccumulator, verbalize
from rlhb_jax.data.readers import read_records
from rlhb_jax.serving import ingest, open_store

_RESERVOIR = 10_000
_SAMPLES = 5
_SHOWN = 10  # flagged identities printed (all are written)


def inspect_store(config: Config, workdir: pathlib.Path) -> dict | None:
  """Screens the identities of the run's feedback store, if it has one; writes and prints what
  was found, and returns it (None without a store)."""
  serve = config.serve
  if not serve.store_url and not (workdir / "feedback.db").exists():
    return None
  with open_store(serve.store_url, workdir, serve.sqlite_synchronous) as store:
    feed, _ = store.read_new()
    where = store.where
  screened = ingest.screen(feed.events, serve.ingest, serve.reaction_types)
  out = {"store": where, "events_read": len(feed.events), **ingest.summary(screened)}
  out["quarantine_path"] = None
  if screened.quarantined:
    path = workdir / "quarantine_identities.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ingest.quarantine_rows(screened)))
    out["quarantine_path"] = str(path)
  (workdir / "inspect_identities.json").write_text(json.dumps(out, indent=1) + "\n")
  print(
    f"inspect_logs: feedback store {where}: {out['events_read']} events from "
    f"{out['identities']} identities ({out['young_identities']} young; median established "
    f"{out['median_events_per_identity']:g} events), {len(out['flagged'])} anomalous, "
    f"{out['quarantined_events']} events quarantined, {out['not_counted_events']} not counted "
    f"(repeated votes, or {out['young_events']} from young sessions)"
  )
  for answer, n in out["bursts"].items():
    print(f"  burst: {n} young or one-event identities reacted to {answer}")
  for address, n in out["crowded_addresses"].items():
    print(f"  burst: {n} young sessions from address {address} (keyed hash)")
  for identity, why in list(out["flagged"].items())[:_SHOWN]:
    print(f"  {identity}: {why['reason']}")
  if len(out["flagged"]) > _SHOWN:
    print(f"  ... and {len(out['flagged']) - _SHOWN} more (all in inspect_identities.json)")
  if out["quarantine_path"]:
    print(f"  quarantine: {out['quarantine_path']}")
  return out


def run(config: Config, workdir: pathlib.Path) -> dict:
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  identities = inspect_store(config, workdir)
  if not config.data.path:
    if identities is None:
      raise ValueError(
        "mode=inspect_logs needs --config.data.path=FILE, or a feedback store "
        "(DIR/feedback.db or --config.serve.store_url)"
      )
    return {"identities": identities}
  behavior = config.behavior
  names = behavior.names
  reader = read_records(config.data.path, config.data, workdir, behavior)
  acc = RangeAccumulator(behavior)
  raw_lo = [math.inf] * len(names)
  raw_hi = [-math.inf] * len(names)
  raw_sum = [0.0] * len(names)
  reservoir: list[dict] = []
  rng = random.Random(config.seed)
  start = time.perf_counter()
  for n, record in enumerate(reader):
    counts = record["behavior"]
    acc.add(counts)
    for i, name in enumerate(names):
      x = counts.get(name, 0)
      raw_lo[i] = min(raw_lo[i], x)
      raw_hi[i] = max(raw_hi[i], x)
      raw_sum[i] += x
    # Reservoir sampling (algorithm R): a uniform sample of all records in O(_RESERVOIR) memory.
    if n < _RESERVOIR:
      reservoir.append(_slim(record))
    else:
      j = rng.randrange(n + 1)
      if j < _RESERVOIR:
        reservoir[j] = _slim(record)
  seconds = time.perf_counter() - start
  report = reader.report
  ok = report.records_ok

  out = {
    "path": config.data.path,
    "lines_read": report.lines_read,
    "records_ok": ok,
    "records_rejected": report.records_rejected,
    "quarantine_path": report.quarantine_path,
    "rejected_by_kind": dict(report.rejected_by_kind),
    "unknown_behavior_keys": dict(report.unknown_behavior_keys),
    "extra_fields": dict(report.extra_fields),
    "first_errors": report.first_errors,
    "bin_edges": {},
    "behavior_stats": {},
    "bin_shares": {},
    "samples": [],
    "seconds": round(seconds, 3),
    "records_per_second": round(report.lines_read / max(seconds, 1e-9), 1),
    "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
  }
  if ok:
    binner = acc.binner()
    binner.save(workdir / "bin_edges.json")
    out["bin_edges"] = binner.edges()
    sample_counts = np.array([[r["behavior"].get(k, 0) for k in names] for r in reservoir], float)
    bins = binner.bin_many(r["behavior"] for r in reservoir)
    for i, name in enumerate(names):
      q = np.percentile(sample_counts[:, i], [50, 90, 99])
      out["behavior_stats"][name] = {
        "min": raw_lo[i],
        "max": raw_hi[i],
        "mean": raw_sum[i] / ok,
        "p50": float(q[0]),
        "p90": float(q[1]),
        "p99": float(q[2]),
      }
      shares = np.bincount(bins[:, i], minlength=behavior.num_bins) / len(bins)
      out["bin_shares"][name] = [round(float(s), 4) for s in shares]
    out["samples"] = [
      {**r, "text": verbalize(b, behavior)}
      for r, b in zip(reservoir[:_SAMPLES], bins, strict=False)
    ]
  (workdir / "inspect.json").write_text(json.dumps(out, indent=1) + "\n")
  _print(out, names)
  keys = ("records_ok", "records_rejected", "quarantine_path", "records_per_second", "peak_rss_mb")
  return {k: out[k] for k in keys} | ({"identities": identities} if identities else {})


def _slim(record: dict) -> dict:
  return {
    "query": record["query"][:200],
    "response": record["response"][:300],
    "behavior": record["behavior"],
  }


def _print(out: dict, names: tuple[str, ...]) -> None:
  print(f"inspect_logs: {out['path']}")
  print(
    f"  lines {out['lines_read']}, ok {out['records_ok']}, rejected {out['records_rejected']}"
    f" {out['rejected_by_kind'] or ''}"
  )
  if out["quarantine_path"]:
    print(f"  quarantine: {out['quarantine_path']}")
  for msg in out["first_errors"][:3]:
    print(f"  e.g. {msg}")
  if out["unknown_behavior_keys"]:
    print(f"  unknown behavior keys (kept): {out['unknown_behavior_keys']}")
  print(f"  {out['records_per_second']:.0f} records/s, peak RSS {out['peak_rss_mb']:.0f} MB")
  for name in names:
    if name not in out["behavior_stats"]:
      continue
    s = out["behavior_stats"][name]
    edges = ", ".join(f"{e:.2f}" for e in out["bin_edges"][name])
    print(
      f"  {name:12s} min {s['min']:g} mean {s['mean']:.1f} p90 {s['p90']:g} max {s['max']:g}"
      f" | log1p edges [{edges}] | bin shares {out['bin_shares'][name]}"
    )
  for sample in out["samples"][:3]:
    print(f"  - {sample['query']!r} -> {sample['response'][:60]!r}\n    {sample['text']}")
