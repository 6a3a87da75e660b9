"""The pipeline (what `make demo` runs): simulate logs -> SFT -> D warm-up -> RLHB -> evaluation.

Writes DIR/summary.json and prints it as a table beside the users' ceiling (each method's share of
the gap SFT leaves to it), the answers RLHB changed ranked by the users' like-rate difference, and
the behavior knob (eval/showcase.py); then DIR/report.html, one self-contained page of all of it
with the training curves. Every stage resumes from what the run directory already holds, so
re-running after an interruption continues where it stopped.
"""

from __future__ import annotations

import json
import pathlib
import time

from rlhb_jax.config import Config
from rlhb_jax.eval import evaluate, showcase
from rlhb_jax.infra import sharding
from rlhb_jax.infra.metrics import read_jsonl
from rlhb_jax.infra.report import plot_series, plot_training
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

  queries = evaluate.heldout_queries(run_)
  top = showcase.ceiling(run_, queries)
  samples = json.loads((run_.workdir / "eval_samples.json").read_text())
  changed = showcase.changed_answers(samples)
  t_knob = time.perf_counter()
  knob = (
    showcase.knob(run_, run_.actor_model(prefer=("rlhb_actor",)), queries)
    if cfg.eval.knob
    else None
  )
  knob_seconds = time.perf_counter() - t_knob
  sft_like = results["sft"]["like_rate"]
  summary = {
    "methods": {
      "sft": {k: results["sft"][k] for k in (*evaluate.RATE_KEYS, *evaluate.CITE_KEYS)},
      "rlhb": {
        k: results["rlhb"][k]
        for k in (*evaluate.RATE_KEYS, *evaluate.CITE_KEYS, "win", "tie", "loss")
      },
    },
    "ceiling": {
      "like_rate": top,
      "num_queries": len(queries),
      "gap_closed": {"rlhb": showcase.gap_closed(results["rlhb"]["like_rate"], sft_like, top)},
    },
    "changed": changed,
    "knob": knob,
    "knob_seconds": knob_seconds,
    "disc": {"real_mean": mean("d_real"), "fake_mean": mean("d_fake")},
    "wall_seconds": time.perf_counter() - t0,
  }
  plots = []
  if sharding.is_primary():  # every process evaluated alike; one writes
    (run_.workdir / "summary.json").write_text(json.dumps(summary, indent=2))
    if cfg.log.plots:
      plots = plot_training(run_.workdir, stream="rlhb")
      plots.append(_heldout_curve(run_.workdir, rl, sft_like, top))
  table_rows = {**results, "ceiling": {"like_rate": top}}
  evaluate.print_results(table_rows)
  gap = summary["ceiling"]["gap_closed"]["rlhb"]
  print(
    f"users' ceiling on these {len(queries)} queries: {top:.3f}; RLHB closes "
    f"{'n/a' if gap is None else f'{gap:.0%}'} of SFT's gap to it"
  )
  show = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
  print(
    f"discriminator (last 10% of steps): D(real)={show(summary['disc']['real_mean'])} "
    f"D(fake)={show(summary['disc']['fake_mean'])}; wall {summary['wall_seconds']:.0f}s"
  )
  if sharding.is_primary():
    showcase.print_changed(changed)
    if knob is not None:
      print(
        f"the behavior knob (RLHB's generator, {len(queries)} queries each, {knob_seconds:.0f}s):"
      )
      print(showcase.knob_table(knob))
      for name, v in knob.items():
        ex = v["example"]
        print(f"  {name}: {v['behavior']!r}\n    {ex['query']} -> {' '.join(ex['answer'].split())}")
  print(f"summary: {run_.workdir / 'summary.json'}")  # every process: each evaluated alike
  if sharding.is_primary():
    header = f"{cfg.model.source}, seed {cfg.seed}, {summary['wall_seconds']:.0f} s"
    report = showcase.write_report(
      run_.workdir / "report.html",
      evaluate.format_results(table_rows),
      plots,
      changed,
      knob,
      header,
    )
    print(f"report: {report}")
  return summary


def _heldout_curve(workdir: pathlib.Path, rows: list[dict], sft: float, top: float):
  """The held-out like rate over RLHB's steps (eval.curve_every), SFT's and the ceiling."""
  xs = [r["step"] for r in rows if r.get("eval_like_rate") is not None]
  ys = [r["eval_like_rate"] for r in rows if r.get("eval_like_rate") is not None]
  series = {"RLHB (curve queries)": (xs, ys)}
  if xs:
    series["SFT (evaluation queries)"] = ([0, max(xs)], [sft, sft])
  return plot_series(
    workdir / "plots" / "heldout_like_rate.png", series,
    f"Held-out like rate (dashed: the users' ceiling, {top:.3f})", "RLHB step", "like rate", top,
  )  # fmt: skip
