"""The pipeline (what `make demo` runs): simulate logs -> SFT -> D warm-up -> RLHB -> evaluation.

Writes DIR/summary.json and prints it as a table, with three held-out answers of SFT and RLHB
side by side and the paths of the discriminator's and the reward's curves. Every stage resumes
from what the run directory already holds, so re-running after an interruption continues where it
stopped.
"""

from __future__ import annotations

import json
import pathlib
import time

from rlhb_jax.config import Config
from rlhb_jax.eval import evaluate
from rlhb_jax.infra import sharding
from rlhb_jax.infra.metrics import read_jsonl
from rlhb_jax.infra.report import plot_training
from rlhb_jax.methods import disc as disc_lib
from rlhb_jax.methods import sft as sft_lib
from rlhb_jax.methods.ppo import stages as ppo_stages
from rlhb_jax.run import Run


def run(cfg: Config, workdir: pathlib.Path) -> dict:
  t0 = time.perf_counter()
  run_ = Run(cfg, workdir).prepare()
  print(f"logs: {run_.logs_path} ({len(run_.examples)} records)")
  print(f"most preferred behavior: {run_.best_behavior!r}")
  sft_lib.sft(run_)
  disc_lib.disc_warmup(run_)
  ppo_stages.rlhb(run_)
  results = evaluate.evaluate(run_, {"sft": "sft_actor", "rlhb": "rlhb_actor"})
  sharding.barrier("metrics")  # the first process wrote rlhb.jsonl
  rl = read_jsonl(run_.workdir / "rlhb.jsonl")
  tail = rl[-max(1, len(rl) // 10) :]

  def mean(key: str) -> float | None:  # None when D gave no reward (e.g. reward.source=sim)
    values = [r[key] for r in tail if r.get(key) is not None]
    return sum(values) / len(values) if values else None

  summary = {
    "methods": {
      "sft": {k: results["sft"][k] for k in (*evaluate.RATE_KEYS, *evaluate.CITE_KEYS)},
      "rlhb": {
        k: results["rlhb"][k]
        for k in (*evaluate.RATE_KEYS, *evaluate.CITE_KEYS, "win", "tie", "loss")
      },
    },
    "disc": {"real_mean": mean("d_real"), "fake_mean": mean("d_fake")},
    "wall_seconds": time.perf_counter() - t0,
  }
  if sharding.is_primary():  # every process evaluated alike; one writes
    (run_.workdir / "summary.json").write_text(json.dumps(summary, indent=2))
    if cfg.log.plots:
      plot_training(run_.workdir, stream="rlhb")
  evaluate.print_results(results)
  show = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
  print(
    f"discriminator (last 10% of steps): D(real)={show(summary['disc']['real_mean'])} "
    f"D(fake)={show(summary['disc']['fake_mean'])}; wall {summary['wall_seconds']:.0f}s"
  )
  if sharding.is_primary():
    print_examples(run_.workdir / "eval_samples.json", ("sft", "rlhb"), n=3)
    plots = [run_.workdir / "plots" / f for f in ("disc_scores.png", "return.png")]
    print("curves: " + ", ".join(str(p) for p in plots if p.exists()))
  print(f"summary: {run_.workdir / 'summary.json'}")
  return summary


def print_examples(path: pathlib.Path, methods: tuple[str, ...], n: int) -> None:
  """The first `n` held-out queries with each method's answer, side by side."""
  samples = json.loads(path.read_text())[:n]
  width = max(len(m) for m in methods)
  for i, sample in enumerate(samples, 1):
    print(f"example {i}: {sample['query']}")
    for m in methods:
      print(f"  {m:>{width}}: {' '.join(sample[m].split())}")
