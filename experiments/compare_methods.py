"""SFT vs RLHF vs RLHBC vs RLHB vs RLHF + RLHB vs DPO and KTO on the same logs, budget and seeds.

  python experiments/compare_methods.py --seeds 0,1,2 [--runs runs/compare] [-- --config.x=y ...]

Every seed runs, in its own run directory (an existing one resumes stage by stage): simulated
logs, the BPE, behavior-conditioned SFT, the discriminator warm-up, the reward model and RLHF, the
behavior classifier and RLHBC, RLHB, RLHB continued from the RLHF policy, and the offline methods
from the same SFT start: DPO on behavior pairs from the logs, DPO on the annotators' pairs and KTO
on single answers marked by their behavior (as many answers seen as PPO samples). All are evaluated
on the same held-out queries (simulator ground truth, most preferred behavior), Win / Tie / Loss
against SFT by the simulated users. Writes results/compare.json, results/compare.md and
results/img/compare_*.png. Ablations are config flags after `--`, e.g.
`--config.ppo.rollouts_per_prompt=6`, `--config.disc.bootstrap_ratio=0.2`,
`--config.ppo.reward_transform=logit`. `--methods sft,dpo,kto` trains and evaluates only those and
carries the others over from an existing results/compare.json of the same seeds.
"""

from __future__ import annotations

import argparse
import ast
import json
import pathlib
import sys
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rlhb_jax import config as config_lib  # noqa: E402
from rlhb_jax.eval import evaluate  # noqa: E402
from rlhb_jax.infra.metrics import read_jsonl  # noqa: E402
from rlhb_jax.infra.report import format_markdown_table, plot_series  # noqa: E402
from rlhb_jax.methods import disc as disc_lib  # noqa: E402
from rlhb_jax.methods import dpo as dpo_lib  # noqa: E402
from rlhb_jax.methods import kto as kto_lib  # noqa: E402
from rlhb_jax.methods import sft as sft_lib  # noqa: E402
from rlhb_jax.methods.ppo import stages as ppo_stages  # noqa: E402
from rlhb_jax.run import Run  # noqa: E402

METHODS = ("sft", "rlhf", "rlhbc", "rlhb", "rlhf_rlhb", "dpo", "dpo_annotators", "kto")
KEYS = ("like_rate", "dislike_rate", "requery_rate", "accuracy", "win", "tie", "loss")


def load_config(overrides: list[str], path: str = "configs/compare.py") -> config_lib.Config:
  """The config file at `path` with `--config.a.b=value` overrides (values read as Python
  literals)."""
  cd = config_lib.load_configdict(ROOT / path)
  for item in overrides:
    key, sep, raw = item.removeprefix("--config.").partition("=")
    if not item.startswith("--config.") or not sep:
      raise SystemExit(f"override {item!r}: expected --config.a.b=value")
    try:
      value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
      value = raw
    cd.update_from_flattened_dict({key: value})
  return config_lib.from_configdict(cd)


def _dpo_annotators(run: Run) -> None:
  cfg = config_lib.replace(run.cfg, **{"dpo.pairs": "annotators"})
  dpo_lib.dpo(Run(cfg, run.workdir).prepare())


TRAINERS = {  # method -> the stages that make its generator (each skips what is already done)
  "sft": lambda run: None,
  "rlhf": ppo_stages.rlhf,
  "rlhbc": ppo_stages.rlhbc,
  "rlhb": lambda run: (disc_lib.disc_warmup(run), ppo_stages.rlhb(run)),
  "rlhf_rlhb": ppo_stages.rlhf_rlhb,
  "dpo": dpo_lib.dpo,
  "dpo_annotators": _dpo_annotators,
  "kto": kto_lib.kto,
}
REPORT_OF = {
  "rlhf": "reward_model",
  "rlhbc": "behavior_classifier",
  "dpo": "dpo",
  "dpo_annotators": "dpo_annotators",
  "kto": "kto",
}


def run_seed(cfg: config_lib.Config, workdir: pathlib.Path, methods: list[str]) -> dict:
  """Trains and evaluates `methods` on one seed; each method's result is kept in
  compare_<method>.json, so a rerun (or one adding methods) redoes only what is missing."""
  run = Run(cfg, workdir).prepare()
  sft_lib.sft(run)
  results, reports, wall = {}, {}, {}
  for m in methods:
    path = workdir / f"compare_{m}.json"
    if not path.exists():
      t0 = time.perf_counter()
      TRAINERS[m](run)
      out = evaluate.evaluate(run, {"sft": "sft_actor", m: f"{m}_actor"})
      out["sft"] |= {"win": 0.0, "tie": 1.0, "loss": 0.0}  # against itself, by definition
      report = workdir / "models" / f"{REPORT_OF.get(m, '-')}.json"
      blob = {
        "result": out[m],
        "report": json.loads(report.read_text()) if report.exists() else None,
        "wall_seconds": time.perf_counter() - t0,
      }
      path.write_text(json.dumps(blob, indent=2))
    blob = json.loads(path.read_text())
    results[m], wall[m] = blob["result"], blob["wall_seconds"]
    if blob["report"] is not None:
      reports[REPORT_OF[m]] = blob["report"]
  return {"results": results, "reports": reports, "wall_seconds": wall}


def figures(workdir: pathlib.Path, img: pathlib.Path) -> list[pathlib.Path]:
  def series(stream, key):
    rows = [r for r in read_jsonl(workdir / f"{stream}.jsonl") if r.get(key) is not None]
    return [r["step"] for r in rows], [r[key] for r in rows]

  names = {"rlhf": "RLHF", "rlhbc": "RLHBC", "rlhb": "RLHB", "rlhf_rlhb": "RLHF + RLHB"}
  out = [
    plot_series(
      img / "compare_win_rate.png",
      {names[m]: series(m, "eval_win") for m in names},
      "Win rate against SFT over training (48 held-out queries, simulated users)",
      "PPO step",
      "win rate",
    ),
    plot_series(
      img / "compare_reward.png",
      {names[m]: series(m, "rm_reward_mean") for m in ("rlhf", "rlhbc")},
      "Mean reward over training (RM score; classifier formula)",
      "PPO step",
      "reward",
      smooth=5,
    ),
    plot_series(
      img / "compare_disc_loss.png",
      {names[m]: series(m, "disc_loss") for m in ("rlhb", "rlhf_rlhb")},
      "Discriminator loss",
      "PPO step",
      "loss",
      smooth=5,
    ),
    plot_series(
      img / "compare_disc_reward.png",
      {
        **{f"{names[m]} D(generated)": series(m, "d_fake_rollout") for m in ("rlhb", "rlhf_rlhb")},
        **{f"{names[m]} mean return": series(m, "reward_mean") for m in ("rlhb", "rlhf_rlhb")},
      },
      "Discriminator reward and mean return",
      "PPO step",
      "value",
      hline=0.5,
      smooth=5,
    ),
  ]
  return out


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--seeds", default="0,1,2")
  ap.add_argument("--runs", default="runs/compare")
  ap.add_argument("--out", default="results")
  ap.add_argument(
    "--methods",
    default=",".join(METHODS),
    help="the methods to train and evaluate; the others are carried over from an existing "
    "OUT/compare.json of the same seeds (marked in its `carried_over`)",
  )
  ap.add_argument("overrides", nargs="*", help="--config.* flags for configs/compare.py")
  args = ap.parse_args()
  seeds = [int(s) for s in args.seeds.split(",")]
  methods = [m for m in METHODS if m in args.methods.split(",")]
  t0 = time.perf_counter()
  per_seed = []
  for seed in seeds:
    cfg = load_config([*args.overrides, f"--config.seed={seed}", "--config.log.progress=False"])
    workdir = pathlib.Path(args.runs) / f"seed_{seed}"
    blob = run_seed(cfg, workdir, methods)
    per_seed.append(blob)
    rows = [{"method": m, **blob["results"][m]} for m in methods]
    print(f"seed {seed} ({sum(blob['wall_seconds'].values()):.0f}s)")
    print(format_markdown_table(rows, ["method", *KEYS]))
  out = pathlib.Path(args.out)
  previous = (
    json.loads((out / "compare.json").read_text()) if (out / "compare.json").exists() else {}
  )
  carried = {}
  if previous.get("seeds") == seeds and previous.get("overrides", []) == args.overrides:
    carried = {m: v for m, v in previous["methods"].items() if m not in methods}
  summary = {
    "date": time.strftime("%Y-%m-%d"),
    "methods": {
      m: {
        k: {
          "mean": float(np.mean([b["results"][m][k] for b in per_seed])),
          "std": float(np.std([b["results"][m][k] for b in per_seed])),
          "per_seed": [b["results"][m][k] for b in per_seed],
        }
        for k in KEYS
      }
      for m in methods
    }
    | carried,
    "carried_over": {
      m: previous.get("carried_over", {}).get(m, previous.get("date", "2026-11-26"))
      for m in carried
    },
    "seeds": seeds,
    "reports": {
      str(s): previous.get("reports", {}).get(str(s), {}) | b["reports"]
      for s, b in zip(seeds, per_seed, strict=True)
    },
    "seed_wall_seconds": {str(s): b["wall_seconds"] for s, b in zip(seeds, per_seed, strict=True)},
    "wall_seconds": time.perf_counter() - t0,
    "overrides": args.overrides,
  }
  names = [m for m in METHODS if m in summary["methods"]]
  out.mkdir(parents=True, exist_ok=True)
  (out / "compare.json").write_text(json.dumps(summary, indent=2))
  rows = [
    {
      "method": m,
      **{k: f"{v['mean']:.3f} ± {v['std']:.3f}" for k, v in summary["methods"][m].items()},
    }
    for m in names
  ]
  table = format_markdown_table(rows, ["method", *KEYS])
  note = "".join(f"\n{m}: measured {d}." for m, d in summary["carried_over"].items())
  (out / "compare.md").write_text(
    f"# Method comparison (seeds {seeds}, mean ± std)\n\n{table}\n\n"
    f"Wall time {summary['wall_seconds'] / 60:.1f} min for {', '.join(methods)}; overrides: "
    f"{args.overrides or 'none'}.{note}\n"
  )
  if all(m in methods for m in ("rlhf", "rlhbc", "rlhb", "rlhf_rlhb")):
    figures(pathlib.Path(args.runs) / f"seed_{seeds[0]}", out / "img")
  print(table)
  print(f"wrote {out / 'compare.json'}, {out / 'compare.md'}")


if __name__ == "__main__":
  main()
