"""mode=eval: held-out simulator queries, conditioned on the most preferred behavior.

Expected like / dislike / requery / click rates and accuracy come from the simulator's ground truth;
Win / Tie / Loss against the SFT generator from the simulated users' judge.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib

import jax
import numpy as np
from flax import nnx

from rlhb_jax.config import Config
from rlhb_jax.data.batches import simulator_results
from rlhb_jax.eval.judges import LLMJudge, SimulatedUsersJudge, win_tie_loss
from rlhb_jax.infra import sharding
from rlhb_jax.infra.report import format_table
from rlhb_jax.model import build as build_lib
from rlhb_jax.model.sampling import generate_texts
from rlhb_jax.run import Run

RATE_KEYS = ("like_rate", "dislike_rate", "requery_rate", "click_rate", "accuracy")
# Shares of answers citing the shown result's site, and citing anything else (sim/judge.py).
CITE_KEYS = ("grounded_rate", "fabricated_rate")


def heldout_queries(run: Run) -> list[str]:
  queries = run.simulator.queries("heldout")
  rng = np.random.default_rng([run.cfg.seed, 7])
  n = min(run.cfg.eval.num_queries or len(queries), len(queries))
  return [queries[i] for i in sorted(rng.choice(len(queries), n, replace=False))]


def respond(run: Run, model, queries: list[str], behavior: str | None = None) -> list[str]:
  """Greedy responses conditioned on `behavior` (default: the most preferred behavior)."""
  cfg = run.cfg
  shown = simulator_results(run.simulator)
  contexts = [shown(q) for q in queries] if run.uses_context else None
  prompts = run.batcher.eval_prompts(queries, behavior or run.best_behavior, contexts)
  sampling = dataclasses.replace(cfg.sampling, greedy=True)
  outs = generate_texts(
    model, run.tokenizer, prompts, jax.random.key(cfg.seed), sampling, cfg.eval.batch_size
  )
  return [text for _, text in outs]


def ground_truth(
  run: Run,
  queries: list[str],
  responses: list[str],
  round: int | None = None,
  per_query: list | None = None,
):
  """The users' mean expected rates, accuracy and citation shares of `responses`; with
  `per_query` (a list) each query's rates are appended to it too."""
  sim = run.simulator
  rates = [sim.expected_rates(q, r, round) for q, r in zip(queries, responses, strict=True)]
  if per_query is not None:
    per_query.extend(rates)
  features = [sim.features(q, r) for q, r in zip(queries, responses, strict=True)]
  out = {f"{k}_rate": float(np.mean([r[k] for r in rates])) for k in rates[0]}
  out["accuracy"] = float(np.mean([f.answer == "correct" for f in features]))
  out["grounded_rate"] = float(np.mean([f.source for f in features]))
  out["fabricated_rate"] = float(np.mean([f.fabricated for f in features]))
  return out


def curve_hook(run: Run):
  """`train_loop` hook: the generator's win rate vs. SFT and like rate on `eval.curve_queries`
  held-out queries (evenly spaced through `heldout_queries`, which is in knowledge-base order, so
  every domain is represented), as eval_* metrics."""
  every = heldout_queries(run)
  n = min(run.cfg.eval.curve_queries, len(every))
  queries = [every[i] for i in np.linspace(0, len(every) - 1, n).round().astype(int)]
  model = run.actor_model(prefer=("sft_actor",))
  baseline = respond(run, model, queries)
  judge = SimulatedUsersJudge(run.simulator)

  def hook(step: int, state) -> dict[str, float]:
    merged = build_lib.merged_params(state.actor, state.frozen["actor"], run.cfg.lora)
    nnx.update(model, sharding.to_host(merged))  # a copy: the step donates the state
    answers = respond(run, model, queries)
    wtl = win_tie_loss(judge, queries, answers, baseline)
    truth = ground_truth(run, queries, answers)
    return {
      "eval_win": wtl["win"],
      "eval_loss": wtl["loss"],
      "eval_like_rate": truth["like_rate"],
      "eval_accuracy": truth["accuracy"],
      "eval_grounded_rate": truth["grounded_rate"],
      "eval_fabricated_rate": truth["fabricated_rate"],
    }

  return hook


def make_judge(cfg: Config, simulator):
  """The Win / Tie / Loss judge of `config.eval.judge`."""
  if cfg.eval.judge == "sim":
    return SimulatedUsersJudge(simulator)
  if cfg.eval.judge_model.source == "tiny":
    raise ValueError("config.eval.judge=llm needs a checkpoint in config.eval.judge_model")
  from rlhb_jax.model.loading import load_model

  model, tokenizer = load_model(cfg.eval.judge_model)
  return LLMJudge(model, tokenizer)


def evaluate(run: Run, methods: dict[str, str]) -> dict:
  """Scores each method's generator (name -> models/<params>) and compares it with SFT; every
  query's answers and like rates go to eval_samples.json."""
  queries = heldout_queries(run)
  responses, results, likes = {}, {}, {}
  for name, params_name in methods.items():
    model = run.actor_model(prefer=(params_name,))
    responses[name] = respond(run, model, queries)
    per_query = []
    results[name] = ground_truth(run, queries, responses[name], per_query=per_query)
    likes[name] = [r["like"] for r in per_query]
  judge = make_judge(run.cfg, run.simulator)
  for name in methods:
    if name != "sft" and "sft" in responses:
      results[name] |= win_tie_loss(judge, queries, responses[name], responses["sft"])
  samples = [
    {"query": q, **{m: responses[m][i] for m in methods}, "like": {m: likes[m][i] for m in methods}}
    for i, q in enumerate(queries)
  ]
  if sharding.is_primary():
    (run.workdir / "eval_samples.json").write_text(json.dumps(samples, indent=1))
  return results


def format_results(results: dict) -> str:
  rows = [{"method": m, **v} for m, v in results.items()]
  cols = ["method", *RATE_KEYS, *CITE_KEYS, "win", "tie", "loss"]
  return format_table(rows, [c for c in cols if any(c in r for r in rows)])


def print_results(results: dict) -> None:
  print(format_results(results))


class MissingModelError(Exception):
  """mode=eval found no SFT generator to score the others against."""


def run(cfg: Config, workdir: pathlib.Path) -> dict:
  if not (workdir / "models" / "sft_actor").exists():  # else the base weights would pass as SFT
    raise MissingModelError(
      f"{workdir / 'models' / 'sft_actor'} is missing: mode=eval scores every trained generator "
      "against the SFT one; train it first (config.mode=sft, or the pipeline)"
    )
  run_ = Run(cfg, workdir).prepare()
  methods = {"sft": "sft_actor"}
  for name in ("rlhf", "rlhbc", "rlhb", "rlhf_rlhb", "dpo", "dpo_annotators", "kto", "online"):
    if run_.has_params(f"{name}_actor"):
      methods[name] = f"{name}_actor"
  results = evaluate(run_, methods)
  if sharding.is_primary():
    (run_.workdir / "eval.json").write_text(json.dumps(results, indent=2))
  print_results(results)
  return results
