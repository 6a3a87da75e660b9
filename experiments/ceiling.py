"""The users' ceiling: the best expected like rate any response of the simulator's templates earns.

For every held-out query, `Simulator.ceiling` scores each response the logging policy can write
(every style, with and without a citation of the shown site or of any other, each tone phrase:
`sim.policy.every_response`) under the simulated users and keeps the best. The mean over the
queries is the like rate no generator that writes like the logs can beat; results tables report
each method's share of the gap SFT leaves to it: (method - SFT) / (ceiling - SFT).

  python experiments/ceiling.py [--config configs/default.py] [--seeds 0,1,2] [--out FILE]

Prints the mean over all held-out queries and over the config's evaluation subset
(`eval.num_queries`, chosen per seed as mode=eval chooses it), and the best response's style mix.
"""

from __future__ import annotations

import argparse
import collections
import json
import pathlib
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from rlhb_jax import config as config_lib  # noqa: E402
from rlhb_jax.eval.evaluate import heldout_queries  # noqa: E402
from rlhb_jax.run import Run  # noqa: E402


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  ap.add_argument("--config", default="configs/default.py")
  ap.add_argument("--seeds", default="0,1,2")
  ap.add_argument("--out", default=str(ROOT / "results" / "ceiling.json"))
  args = ap.parse_args()
  t0 = time.perf_counter()
  seeds = [int(s) for s in args.seeds.split(",")]
  cd = config_lib.load_configdict(ROOT / args.config)
  cfg = config_lib.from_configdict(cd)
  run = Run(cfg, ROOT / "runs" / ".ceiling")
  sim = run.simulator
  every = sim.queries("heldout")
  best = {q: sim.ceiling(q) for q in every}
  mean_all = float(np.mean([b[0] for b in best.values()]))
  cited = collections.Counter(
    ("cites the shown site" if sim.features(q, r).source else "no grounded citation")
    for q, (_, r) in best.items()
  )
  subsets = {}
  for seed in seeds:
    cd.seed = seed
    sub = heldout_queries(Run(config_lib.from_configdict(cd), run.workdir))
    subsets[str(seed)] = {
      "num_queries": len(sub),
      "ceiling": round(float(np.mean([best[q][0] for q in sub])), 4),
    }
  out = {
    "command": "python " + " ".join(sys.argv),
    "config": args.config,
    "num_heldout": len(every),
    "ceiling": round(mean_all, 4),
    "eval_subsets": subsets,
    "best_responses": dict(cited),
    "examples": [
      {"query": q, "like": round(b[0], 4), "response": b[1]} for q, b in list(best.items())[:5]
    ],
    "seconds": round(time.perf_counter() - t0, 1),
  }
  print(f"users' ceiling over all {len(every)} held-out queries: {mean_all:.4f}")
  for seed, s in subsets.items():
    print(f"  seed {seed}'s {s['num_queries']} evaluation queries: {s['ceiling']:.4f}")
  print(f"  best responses: {dict(cited)}")
  pathlib.Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
