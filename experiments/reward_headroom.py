"""How much could a reward lift a run's generator? Best-of-n reranking as a probe.

For the held-out evaluation queries (most preferred behavior, with their search results), samples n
responses per query from a run's generator and reports the simulator's ground-truth like rate and
accuracy of: greedy decoding, a random sample, the sample the discriminator ranks first (the RLHB
reward: D(best) - D(worst) in logits with `ppo.reward_contrast`, else D(best); D(best) alone is
shown too), and the sample the simulator ranks first (an oracle reward). PPO on a reward seldom
beats best-of-n reranking by that reward by much at a modest KL, so the D row says what RLHB can add
with this discriminator, and the oracle row what any reward could add from this policy.

  python experiments/reward_headroom.py --workdir runs/demo [--n 8] [--disc disc_warmup|rlhb_disc]
      [--actor sft_actor] [--temperature 1.0] [--show 4] [--config configs/default.py]

Results of 2026-11-27 are in results/reward_headroom.json and docs/RESULTS.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from rlhb_jax import config as config_lib  # noqa: E402
from rlhb_jax.data.batches import left_pad, right_pad, simulator_results  # noqa: E402
from rlhb_jax.eval import evaluate  # noqa: E402
from rlhb_jax.methods import disc as disc_lib  # noqa: E402
from rlhb_jax.model import build as build_lib  # noqa: E402
from rlhb_jax.model.sampling import generate_texts  # noqa: E402
from rlhb_jax.run import Run  # noqa: E402


def load_config(path: str, seed: int) -> config_lib.Config:
  cd = config_lib.load_configdict(ROOT / path)
  cd.seed = seed
  return config_lib.from_configdict(cd)


def disc_scorer(run: Run, model, name: str):
  """(best-behavior logits, contrast logits) of responses, from the run's `models/<name>`."""
  disc = build_lib.build_disc(run.cfg, model, run.tokenizer.vocab_size)
  params = run.load_params(name, disc)
  if params is None:
    raise FileNotFoundError(f"{run.workdir}/models/{name}: no discriminator there")
  nnx.update(disc, params)
  graphdef, params = nnx.split(disc)

  @jax.jit
  def score(params, best, best_mask, worst, worst_mask, resp, resp_mask):
    d = disc_lib.score(graphdef, params, best, best_mask, resp, resp_mask)
    return d, disc_lib.score(graphdef, params, worst, worst_mask, resp, resp_mask)

  return lambda *arrays: score(params, *map(jnp.asarray, arrays))


def probe(run: Run, actor: str, disc: str, n: int, temperature: float, show: int = 0) -> dict:
  """Best-of-n rows {name: {"like_rate", "accuracy"}} and the pooled AUC, for `models/<actor>`
  sampled at `temperature` and ranked by `models/<disc>`."""
  cfg = run.cfg
  sim, b = run.simulator, run.batcher
  queries = evaluate.heldout_queries(run)
  Q = len(queries)
  model = run.actor_model(prefer=(actor,))
  greedy = evaluate.ground_truth(run, queries, evaluate.respond(run, model, queries))
  contexts = [simulator_results(sim)(q) for q in queries] if run.uses_context else [""] * Q
  prompts = b.eval_prompts(queries, run.best_behavior, contexts)
  sampling = dataclasses.replace(cfg.sampling, greedy=False, temperature=temperature)
  samples = [
    [text for _, text in generate_texts(model, run.tokenizer, prompts, jax.random.key(1000 + k),
                                        sampling, cfg.eval.batch_size)]
    for k in range(n)
  ]  # fmt: skip

  score = disc_scorer(run, model, disc)
  pairs = list(zip(queries, contexts, strict=True))
  best = left_pad([b.enc.prefix(q, run.best_behavior, c) for q, c in pairs], b.Pd, b.pad)
  worst = left_pad([b.enc.prefix(q, b.worst, c) for q, c in pairs], b.Pd, b.pad)
  reward, plain, least, like, correct = (np.zeros((n, Q)) for _ in range(5))
  for k in range(n):
    resp = right_pad([b.enc.response(t) for t in samples[k]], b.Tn, b.pad)
    d, c = (np.asarray(x) for x in score(*best, *worst, *resp))
    reward[k], plain[k], least[k] = (d - c if cfg.ppo.reward_contrast else d), d, c
    for i, (q, r) in enumerate(zip(queries, samples[k], strict=True)):
      like[k, i] = sim.expected_rates(q, r)["like"]
      correct[k, i] = sim.features(q, r).answer == "correct"

  for i in range(0, Q, max(1, Q // max(show, 1)))[:show]:
    print(f"{queries[i]!r} | search result: {contexts[i]}")
    for k in np.argsort(-reward[:, i]):
      scores = f"reward {reward[k, i]:+6.2f}  D(best) {plain[k, i]:+6.2f}  like {like[k, i]:.2f}"
      print(f"  {scores}  {samples[k][i]!r}")

  cols = np.arange(Q)
  pick = lambda by: (float(like[by, cols].mean()), float(correct[by, cols].mean()))  # noqa: E731
  used = "D(best) - D(least preferred)" if cfg.ppo.reward_contrast else "D(best)"
  rows = {
    "greedy": (greedy["like_rate"], greedy["accuracy"]),
    "random sample": (float(like.mean()), float(correct.mean())),
    f"best of {n} by the reward used ({used})": pick(reward.argmax(0)),
    f"best of {n} by D(best)": pick(plain.argmax(0)),
    f"best of {n} by D(best) - D(least preferred)": pick((plain - least).argmax(0)),
    f"best of {n} by the simulator": pick(like.argmax(0)),
  }
  # Pooled over every sample of every query: mostly says which queries are easy, not which answer.
  flat, ok = reward.ravel(), correct.ravel().astype(bool)
  auc = float((flat[ok][:, None] > flat[~ok][None, :]).mean()) if ok.any() and (~ok).any() else None
  print(f"{'':48s} like   accuracy")
  for name, (lr, acc) in rows.items():
    print(f"{name:48s} {lr:.3f}  {acc:.3f}")
  print(f"reward AUC, correct vs. not (pooled): {auc}")
  out = {k: {"like_rate": v[0], "accuracy": v[1]} for k, v in rows.items()}
  return {
    "actor": actor,
    "disc": disc,
    "n": n,
    "temperature": temperature,
    "queries": Q,
    "rows": out,
    "auc_correct_pooled": auc,
  }


def citation_probe(run: Run, actor: str, disc: str) -> dict:
  """Does the discriminator read citations? For each held-out query, one right answer written
  three ways: bare, citing the shown result's site (grounded) and citing another site of its
  domain (fabricated). Reports D(best) of each (logits), how often D ranks grounded above bare and
  above fabricated, and the simulated users' like rate of each."""
  from rlhb_jax.sim.kb import SITES

  sim, b = run.simulator, run.batcher
  queries = evaluate.heldout_queries(run)
  shown = simulator_results(sim)
  variants: dict[str, list[str]] = {"bare": [], "grounded": [], "fabricated": []}
  for q in queries:
    fact, site = sim.lookup(q).fact, sim.source(q)
    statement = fact.statement.format(answer=fact.answer)
    other = next((s for s in SITES[fact.domain] if s != site), "a textbook")
    variants["bare"].append(statement)
    variants["grounded"].append(f"{statement} Source: {site or 'Britannica'}.")
    variants["fabricated"].append(f"{statement} Source: {other}.")
  score = disc_scorer(run, run.actor_model(prefer=(actor,)), disc)
  prefixes = [
    b.enc.prefix(q, run.best_behavior, shown(q) if run.uses_context else "") for q in queries
  ]
  best = left_pad(prefixes, b.Pd, b.pad)
  d, like = {}, {}
  for name, texts in variants.items():
    resp = right_pad([b.enc.response(t) for t in texts], b.Tn, b.pad)
    d[name] = np.asarray(score(*best, *best, *resp)[0])
    like[name] = float(
      np.mean([sim.expected_rates(q, t)["like"] for q, t in zip(queries, texts, strict=True)])
    )
  out = {
    "disc": disc,
    "queries": len(queries),
    "d_best_mean": {k: float(v.mean()) for k, v in d.items()},
    "like_rate": like,
    "d_prefers_grounded_over_bare": float((d["grounded"] > d["bare"]).mean()),
    "d_prefers_grounded_over_fabricated": float((d["grounded"] > d["fabricated"]).mean()),
  }
  print(json.dumps(out, indent=1))
  return out


def main() -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument("--workdir", required=True)
  ap.add_argument("--config", default="configs/tiny.py")
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--n", type=int, default=8)
  ap.add_argument("--actor", default="sft_actor")
  ap.add_argument("--disc", default="disc_warmup")
  ap.add_argument("--temperature", type=float, default=1.0)
  ap.add_argument("--show", type=int, default=0, help="print ranked samples of this many queries")
  args = ap.parse_args()
  run = Run(load_config(args.config, args.seed), pathlib.Path(args.workdir)).prepare()
  out = probe(run, args.actor, args.disc, args.n, args.temperature, args.show)
  print(json.dumps(out))


if __name__ == "__main__":
  main()
