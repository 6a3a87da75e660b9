"""Online alignment on a model that reads (issue #25): SmolLM2 following users whose tastes drift,
online RLHB against the frozen model, online KTO and PPO on the simulated users' own reward.

  python experiments/online_real_model.py --seeds 0,1 [--config configs/smollm2_online.py]
      [--rounds 8] [--drift-round 3] [--arms rlhb,kto,oracle] [--runs runs/online_real_model]
      [--out results/online_real_model.json] [--plot results/img/online_real_model.png]
      [--kto-steps N] [--kto-refit continue|scratch] [--saved results/online_real_model_stages]
      [--report]
      [-- --config.online.steps_per_round=4 ...]

Per seed, one offline stage in RUNS/seed_S/offline (simulated logs, behavior-conditioned SFT, the
discriminator warm-up), whose outputs are linked into one run directory per arm (RUNS/seed_S/ARM,
each with its own feedback store). Each arm runs `mode=online`'s loop (`rlhb_jax/jobs/online.py`)
for --rounds rounds, the users drifting from --drift-round on: every round serves the arm's current
generator over HTTP to the simulated users, their behaviors go into the store, a fixed training
budget runs on the logs and the result is deployed for the next round. The arms:

- frozen: the SFT generator, never retrained. Every arm scores it each round on the held-out
  queries under that round's users (`*_frozen` of its rounds, the same in every arm: the same SFT
  weights, queries and greedy answers), so it costs no run of its own.
- rlhb: online RLHB (`online.learner=rlhb`, `reward.source=disc`): `online.sft_steps` SFT steps on
  the fresh records users liked, then `online.steps_per_round` RLHB steps on the last
  `online.window_rounds` rounds' records.
- kto: online KTO (`online.learner=kto`): after round r, KTO on every round's records so far,
  against the SFT generator as the reference. With --kto-refit continue (the default,
  `online.kto_refit=continue`) it trains the deployed KTO generator (round 0: the SFT one)
  `kto.steps` steps further on them, fresh adapters on its merged weights; with scratch it refits
  from the SFT generator for (r + 1) x `kto.steps` steps. `kto.steps` (--kto-steps, by default)
  makes a round's share as many answers as an RLHB round trains on (`sft_steps` x
  `sft.batch_size` SFT rows plus `steps_per_round` x `ppo.prompts_per_step` x
  `ppo.rollouts_per_prompt` rollouts), so either way the deployed KTO model has seen as many
  answers as the RLHB one.
- oracle: the rlhb arm with PPO on the simulated users' expected like rate under each round's users
  (`reward.source=sim`, the ceiling; the SFT steps as in rlhb).

Every arm of a seed starts from the same SFT weights and serves the same queries in the same order
(drawn from (seed, round)), and each answer's users are drawn from (seed, round, answer index), so
the arms differ only in what they answer. Per round and arm, on the held-out queries under that
round's users (greedy, most preferred behavior): like, dislike and re-ask rates, accuracy,
grounded_rate (the answer cites the shown result's site) and fabricated_rate (it cites another);
besides them the like rate observed in the served traffic, the records, the model step and the
round's wall time (serve, score, collect, train, checkpoint, publish).

Resumes: the offline stage is skipped once done; an arm resumes after its last finished round
(`mode=online`'s checkpoint, a round killed midway runs again) and is skipped once its
online_summary.json holds every round. A finished arm's rounds are also copied to
SAVED/seed_S/ARM.json (with the offline stage's wall time in offline.json; committed), so seeds run
in different sessions gather without their run directories; a saved arm run with other flags stops
the script rather than mix. `--report` gathers what is finished and trains nothing.

Cost on the 2-core CPU (measured 2026-12-04, results/online_real_model.json, docs/PERFORMANCE.md):
configs/smollm2_online.py is configs/default.py's model (rank-8 LoRA, bf16 training matmuls, f32
decoding) with 48 served queries, 4 SFT steps (batch 8) and 4 RLHB steps (2 prompts x 8
rollouts) a round, 48 held-out queries. The offline stage took 244-247 s a seed; the median round
77-82 s for rlhb, 65-70 s for kto (about 30 s of it a compile: a fresh KTO learner each round;
with --kto-refit scratch a round's steps grow with the round) and 60-62 s for oracle. The three
arms' rounds add up to 28-29 minutes a seed; with the offline stage and each arm's loading and
compile, about 35 minutes.

The JSON's per-seed "targets" are issue #25's checks: online RLHB above the frozen model in every
round from the second after the drift, and its post-drift mean at least online KTO's. The
training curves of the rlhb and oracle arms (D on the logged and the generated triplets, the
reward, the KL; the oracle has no D) are saved per step with the arms, averaged per round in the
JSON and drawn, for online RLHB, into PLOT's *_curves.png. The kto arm logs its steps apart
(online_kto_RRR.jsonl in its run directory); they are not gathered.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import pathlib
import shlex
import sys

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "experiments"))

import compare_methods  # noqa: E402
import real_model  # noqa: E402
from real_model import stage  # noqa: E402

from rlhb_jax import config as config_lib  # noqa: E402
from rlhb_jax.infra.metrics import read_jsonl  # noqa: E402
from rlhb_jax.infra.report import format_markdown_table, plot_series  # noqa: E402
from rlhb_jax.jobs import online  # noqa: E402
from rlhb_jax.methods import disc as disc_lib  # noqa: E402
from rlhb_jax.methods import sft as sft_lib  # noqa: E402
from rlhb_jax.run import Run  # noqa: E402

CONFIG = "configs/smollm2_online.py"
ARMS = ("rlhb", "kto", "oracle")
# Scored per round on the held-out queries: (key in the JSON, key in mode=online's rounds).
SCORES = (
  ("like_rate", "like_rate"),
  ("dislike_rate", "dislike_rate"),
  ("requery_rate", "requery_rate"),
  ("accuracy", "accuracy"),
  ("grounded_rate", "grounded_rate"),
  ("fabricated_rate", "fabricated_rate"),
)
# Per trained arm only.
SERVED = ("like_rate_observed", "records", "model_step", "wall_seconds")
# The training steps' curves (mode=online's online.jsonl), kept per step with each saved arm and
# averaged per round in the JSON: D on the round's real and generated triplets, and the reward.
CURVES = ("d_real", "d_fake", "d_swap", "reward_mean", "kl")
# What the offline stage leaves for the arms (linked, never copied: SmolLM2's weights are large).
SHARED = (
  "logs.jsonl",
  "preferences.jsonl",
  "bin_edges.json",
  "tokenizer",
  "models/sft_actor",
  "models/disc_warmup",
)
CONFIG_KEY = ""  # what a saved arm was run with: --config, its flags and the arm flags, no seed
READ_ONLY = False  # --report (real_model.stage reads its own flag, set beside this one)


def kto_steps_per_round(cfg: config_lib.Config) -> int:
  """KTO steps whose answers match one RLHB round's: its SFT rows plus its rollouts."""
  o, p = cfg.online, cfg.ppo
  answers = o.sft_steps * cfg.sft.batch_size + o.steps_per_round * p.prompts_per_step * (
    p.rollouts_per_prompt
  )
  return max(1, math.ceil(answers / cfg.kto.batch_size))


def arm_config(
  cfg: config_lib.Config, arm: str, kto_steps: int, kto_refit: str = "continue"
) -> config_lib.Config:
  changes = {
    "rlhb": {"online.learner": "rlhb"},
    "kto": {"online.learner": "kto", "kto.steps": kto_steps, "online.kto_refit": kto_refit},
    "oracle": {"online.learner": "rlhb", "reward.source": "sim"},
  }[arm]
  return config_lib.replace(cfg, **changes)


def link_offline(offline: pathlib.Path, workdir: pathlib.Path) -> None:
  """The offline stage's logs, bin edges, tokenizer and weights, linked into an arm's directory."""
  for name in SHARED:
    src, dst = offline / name, workdir / name
    if src.exists() and not dst.exists():
      dst.parent.mkdir(parents=True, exist_ok=True)
      os.symlink(src.absolute(), dst)


def train_curves(workdir: pathlib.Path) -> list[dict]:
  """Each training step's round and CURVES (those the arm's learner logs) from online.jsonl."""
  path = workdir / "online.jsonl"
  rows = read_jsonl(path) if path.exists() else []
  keep = ("step", "round", *CURVES)
  return [{k: r[k] for k in keep if r.get(k) is not None} for r in rows]


def round_means(steps: list[dict], round: int) -> dict:
  """CURVES averaged over the training steps of `round` (those logged)."""
  mine = [s for s in steps if s.get("round") == round]
  keys = [k for k in CURVES if any(k in s for s in mine)]
  return {k: float(np.mean([s[k] for s in mine if k in s])) for k in keys}


def run_arm(cfg: config_lib.Config, workdir: pathlib.Path, saved: pathlib.Path | None):
  """The arm's rounds: read back when all are done (from `saved`, the committed copy, or the run
  directory), else run (resuming) unless --report. A finished arm is copied to `saved`, so that
  seeds run in different sessions (their run directories gone) still gather."""
  rounds = cfg.online.rounds
  key = {"config": CONFIG_KEY}
  if saved is not None and saved.exists():
    kept = json.loads(saved.read_text())
    if kept.get("config") != CONFIG_KEY:
      raise SystemExit(f"{saved}: saved for {kept.get('config')}, not {CONFIG_KEY}; move it away")
    if len(kept["rounds"]) >= rounds:
      return kept["rounds"][:rounds], kept.get("steps", [])
  path = workdir / "online_summary.json"
  done = json.loads(path.read_text())["rounds"] if path.exists() else []
  if len(done) < rounds:
    if READ_ONLY:
      return (done, train_curves(workdir)) if done else (None, [])
    done = online.run(cfg, workdir)["rounds"]
  steps = train_curves(workdir)
  if saved is not None:
    saved.parent.mkdir(parents=True, exist_ok=True)
    saved.write_text(json.dumps(key | {"rounds": done[:rounds], "steps": steps}, indent=1))
  return done[:rounds], steps


def run_seed(
  cfg: config_lib.Config,
  workdir: pathlib.Path,
  arms: list[str],
  kto_steps: int,
  kto_refit: str = "continue",
  saved: pathlib.Path | None = None,
):
  offline = workdir / "offline"
  kept = saved / "offline.json" if saved is not None else None

  def prepare():
    run = Run(cfg, offline).prepare()
    sft_lib.sft(run)
    disc_lib.disc_warmup(run)

  every = kept is not None and all((saved / f"{arm}.json").exists() for arm in arms)
  if kept is not None and kept.exists() and (every or READ_ONLY):  # nothing left to train
    done = json.loads(kept.read_text())
  else:
    done = stage(offline, "offline", prepare)
    if done is None:
      return None
    if kept is not None:
      kept.parent.mkdir(parents=True, exist_ok=True)
      kept.write_text(json.dumps(done, indent=1))
  per_arm, per_arm_steps = {}, {}
  for arm in arms:
    link_offline(offline, workdir / arm)
    arm_saved = saved / f"{arm}.json" if saved is not None else None
    rounds, steps = run_arm(arm_config(cfg, arm, kto_steps, kto_refit), workdir / arm, arm_saved)
    if rounds:
      per_arm[arm], per_arm_steps[arm] = rounds, steps
  if not per_arm:
    return None
  n = min(len(r) for r in per_arm.values())
  rows = []
  for i in range(n):
    first = per_arm[arms[0] if arms[0] in per_arm else next(iter(per_arm))][i]
    row = {"round": i}
    for key, src in SCORES:
      row[key] = {"frozen": first[f"{src}_frozen"]}
      row[key] |= {arm: rounds[i][f"{src}_online"] for arm, rounds in per_arm.items()}
    row |= {key: {arm: rounds[i][key] for arm, rounds in per_arm.items()} for key in SERVED}
    row["train"] = {arm: round_means(per_arm_steps[arm], i) for arm in per_arm}
    rows.append(row)
  return {"offline_wall_seconds": done["wall_seconds"], "rounds": rows, "steps": per_arm_steps}


def targets(rounds: list[dict], drift: int) -> dict:
  """Issue #25's two checks on one seed's rounds: online RLHB's like rate above the frozen model's
  in every round from the second after the drift on (rounds drift + 1, ...), and its mean over the
  post-drift rounds (drift, ...) at least online KTO's. A check with no round to judge (no drift,
  or too few rounds gathered) is None."""
  like = [r["like_rate"] for r in rounds]
  after = like[drift:] if drift >= 0 else []
  checked = like[drift + 1 :] if drift >= 0 else []
  out: dict = {"above_frozen_from_round": drift + 1 if drift >= 0 else None}
  if like and "rlhb" in like[0]:
    out["rlhb_above_frozen"] = all(r["rlhb"] > r["frozen"] for r in checked) if checked else None
  means = {a: float(np.mean([r[a] for r in after])) for a in after[0]} if after else {}
  out["post_drift_mean"] = means
  if {"rlhb", "kto"} <= set(means):
    out["rlhb_mean_at_least_kto"] = means["rlhb"] >= means["kto"]
  return out


def plot(path: pathlib.Path, runs: dict, arms: list[str], drift: int) -> None:
  """Like rate per round and arm, the mean over seeds, the drift marked."""
  n = min(len(r["rounds"]) for r in runs.values())
  series = {}
  for arm in ["frozen", *arms]:
    ys = [np.mean([r["rounds"][i]["like_rate"][arm] for r in runs.values()]) for i in range(n)]
    series[arm] = (list(range(n)), ys)
  plot_series(
    path,
    series,
    title=f"Expected like rate on held-out queries, per round (mean of {len(runs)} seeds)",
    xlabel="round",
    ylabel="like rate",
    vline=(drift, "users drift") if drift >= 0 else None,
  )


def plot_curves(path: pathlib.Path, runs: dict, drift: int) -> None:
  """Online RLHB's D on the logged (real) triplets and its reward, D on the generated ones (the
  same as D(fake)), per training step and seed, the drift marked."""
  series = {}
  for seed, r in runs.items():
    steps = r["steps"].get("rlhb", [])
    for key, name in (("d_real", "D(real)"), ("reward_mean", "reward = D(generated)")):
      pts = [(s["step"], s[key]) for s in steps if key in s]
      if pts:
        series[f"seed {seed} {name}"] = ([x for x, _ in pts], [y for _, y in pts])
  first = [
    s["step"] for r in runs.values() for s in r["steps"].get("rlhb", []) if s["round"] >= drift
  ]
  if series:
    plot_series(
      path,
      series,
      title="Online RLHB: the discriminator and the reward per training step",
      xlabel="training step (rounds in order)",
      ylabel="D score / reward",
      hline=0.5,
      vline=(min(first) - 0.5, "users drift") if first else None,
    )


def main(argv: list[str] | None = None) -> dict:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--seeds", default="0,1")
  ap.add_argument("--config", default=CONFIG)
  ap.add_argument("--rounds", type=int, default=8)
  ap.add_argument("--drift-round", type=int, default=3)
  ap.add_argument("--arms", default=",".join(ARMS), help="of rlhb, kto, oracle (frozen: always)")
  ap.add_argument("--kto-steps", type=int, default=0, help="KTO steps per round (0: as RLHB's)")
  ap.add_argument(
    "--kto-refit",
    choices=("continue", "scratch"),
    default="continue",
    help="kto arm: train the deployed model further, or refit from SFT (online.kto_refit)",
  )
  ap.add_argument("--runs", default="runs/online_real_model")
  ap.add_argument(
    "--saved",
    default="results/online_real_model_stages",
    help="finished arms are copied here per seed (commit it; '' for none)",
  )
  ap.add_argument("--out", default="results/online_real_model.json")
  ap.add_argument("--plot", default="results/img/online_real_model.png")
  ap.add_argument("--report", action="store_true", help="gather finished rounds; train nothing")
  ap.add_argument("overrides", nargs="*", help="--config.* flags for --config")
  args = ap.parse_args(argv)
  global READ_ONLY, CONFIG_KEY
  READ_ONLY = real_model.READ_ONLY = args.report
  logging.basicConfig(format="%(asctime)s %(name)s: %(message)s")
  logging.getLogger("rlhb_jax").setLevel(logging.INFO)
  seeds = [int(s) for s in args.seeds.split(",")]
  arms = args.arms.split(",")
  if unknown := set(arms) - set(ARMS):
    raise SystemExit(f"--arms: unknown {sorted(unknown)}; expected some of {ARMS}")
  fixed = [f"--config.online.rounds={args.rounds}", f"--config.sim.drift_round={args.drift_round}"]
  CONFIG_KEY = shlex.join(
    [args.config, *fixed, *args.overrides, f"--kto-steps={args.kto_steps}", args.kto_refit]
  )
  runs, kto_steps = {}, 0
  for seed in seeds:
    flags = [*fixed, *args.overrides, f"--config.seed={seed}", "--config.log.progress=False"]
    cfg = compare_methods.load_config(flags, args.config)
    kto_steps = args.kto_steps or kto_steps_per_round(cfg)
    saved = pathlib.Path(args.saved) / f"seed_{seed}" if args.saved else None
    out = run_seed(
      cfg, pathlib.Path(args.runs) / f"seed_{seed}", arms, kto_steps, args.kto_refit, saved
    )
    if out is None:
      continue
    out["targets"] = targets(out["rounds"], args.drift_round)
    runs[str(seed)] = out
    table = [
      {"round": r["round"], **{f"like {a}": f"{v:.3f}" for a, v in r["like_rate"].items()}}
      for r in out["rounds"]
    ]
    print(f"seed {seed}")
    print(format_markdown_table(table, list(table[0])))
    print(f"targets: {out['targets']}")
  command = "python experiments/online_real_model.py " + shlex.join(
    [
      f"--seeds={args.seeds}",
      f"--config={args.config}",
      f"--rounds={args.rounds}",
      f"--drift-round={args.drift_round}",
      f"--arms={args.arms}",
      f"--kto-refit={args.kto_refit}",
    ]
    + ([f"--kto-steps={args.kto_steps}"] if args.kto_steps else [])
    + (["--", *args.overrides] if args.overrides else [])
  )
  summary = {
    "model": "the generator of --config (configs/smollm2_online.py: SmolLM2-135M-Instruct, LoRA)",
    "config": args.config,
    "seeds": [int(s) for s in runs],
    "drift_round": args.drift_round,
    "rounds": args.rounds,
    "arms": ["frozen", *arms],
    "kto_steps_per_round": kto_steps,
    "kto_refit": args.kto_refit,
    "command": command,
    "machine": "CPU, 2 cores",
    "runs": runs,
  }
  out = pathlib.Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(summary, indent=2))
  if runs:
    plot(pathlib.Path(args.plot), runs, arms, args.drift_round)
    curves = pathlib.Path(args.plot)
    plot_curves(curves.with_name(curves.stem + "_curves.png"), runs, args.drift_round)
  print(f"wrote {out}")
  return summary


if __name__ == "__main__":
  main()
