"""DPO straight from the behavior logs (or from the annotators' pairs): pairs, loss, step,
held-out accuracy and the stage.
"""

from __future__ import annotations

import collections
import functools
import logging
from collections.abc import Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from rlhb_jax.config import Config
from rlhb_jax.data import preferences
from rlhb_jax.data.batches import PromptedBatcher, record_context
from rlhb_jax.data.preferences import Pair
from rlhb_jax.run import Run
from rlhb_jax.training import forward, trainable
from rlhb_jax.training.losses import Array, Metrics, to_f32
from rlhb_jax.training.trainable import SupervisedState

log = logging.getLogger(__name__)


def dpo_loss(
  policy_chosen: Array,
  policy_rejected: Array,
  ref_chosen: Array,
  ref_rejected: Array,
  beta: float,
) -> tuple[Array, Metrics]:
  """Direct preference optimisation (Rafailov et al., 2023), mean over (B,) pairs.

    r(y) = beta (log pi(y | x) - log pi_ref(y | x))        (sequence log-probs, summed over tokens)
    loss = -1/B sum_b log sigmoid(r(y_chosen) - r(y_rejected))

  Metrics: accuracy (share of pairs with r(chosen) > r(rejected)), margin (mean r difference),
  chosen_reward, rejected_reward (mean implicit rewards).
  """
  chosen = beta * (to_f32(policy_chosen) - to_f32(ref_chosen))
  rejected = beta * (to_f32(policy_rejected) - to_f32(ref_rejected))
  margin = chosen - rejected
  loss = jnp.mean(-jax.nn.log_sigmoid(margin))
  margin, chosen, rejected = jax.lax.stop_gradient((margin, chosen, rejected))
  return loss, {
    "accuracy": jnp.mean(margin > 0),
    "margin": jnp.mean(margin),
    "chosen_reward": jnp.mean(chosen),
    "rejected_reward": jnp.mean(rejected),
  }


def behavior_pairs(records: Iterable[Mapping], cfg: Config) -> tuple[list[Pair], dict]:
  """(chosen, rejected) pairs of logged answers to the same (query, context), and a report.

  Records of one answer text to one query are pooled (counts summed). An answer needs at least
  `dpo.min_impressions` impressions; two answers make a pair when their `dpo.rate_type` per
  impression differs by at least `dpo.min_gap`; each query gives at most `dpo.max_pairs_per_query`
  pairs, the widest gaps first. Deterministic in the records' content.
  """
  d, denom = cfg.dpo, cfg.behavior.denominator
  pooled: dict[tuple[str, str], dict[str, list[float]]] = collections.defaultdict(dict)
  n_records = 0
  for r in records:
    n_records += 1
    key = (r["query"], record_context(r))
    counts = pooled[key].setdefault(r["response"], [0.0, 0.0])
    counts[0] += float(r["behavior"].get(d.rate_type, 0))
    counts[1] += float(r["behavior"].get(denom, 0))
  pairs, report = [], collections.Counter()
  for (query, context), answers in sorted(pooled.items()):
    shown = {a: c[0] / c[1] for a, c in answers.items() if c[1] >= d.min_impressions}
    report["answers_below_min_impressions"] += len(answers) - len(shown)
    found = sorted(
      (
        (shown[a] - shown[b], a, b)
        for a in shown
        for b in shown
        if shown[a] - shown[b] >= d.min_gap
      ),
      key=lambda t: (-t[0], t[1], t[2]),
    )
    report["candidate_pairs"] += len(found)
    kept = found[: d.max_pairs_per_query]
    report["queries_with_pairs"] += bool(kept)
    pairs += [Pair(query, a, b, context) for _, a, b in kept]
  return pairs, {
    "records": n_records,
    "queries": len(pooled),
    **{k: int(v) for k, v in report.items()},
    "pairs": len(pairs),
  }


class PairBatcher(PromptedBatcher):
  """(prompt, chosen, rejected) batches of DPO pairs; batch(step) is a pure function of step."""

  def rows(self, pairs: Sequence[Pair]) -> dict[str, np.ndarray]:
    return {
      **self.prompts(pairs),
      **self.answers("chosen", [p.chosen for p in pairs]),
      **self.answers("rejected", [p.rejected for p in pairs]),
    }


def dpo_step(graphdef, tx, beta: float, state: SupervisedState, batch: dict, rng=None):
  """One DPO update on B pairs (chosen and rejected run as one batch of 2B rows)."""
  del rng
  B = batch["chosen"].shape[0]
  rows = (
    forward.stack_twice(batch["prompt"]),
    forward.stack_twice(batch["prompt_mask"]),
    jnp.concatenate([batch["chosen"], batch["rejected"]], axis=0),
    jnp.concatenate([batch["chosen_mask"], batch["rejected_mask"]], axis=0),
  )
  ref = forward.reference_logprobs(graphdef, state, *rows)

  def loss_fn(params):
    lp = forward.sequence_logprobs(graphdef, state.full(params), *rows)
    return dpo_loss(lp[:B], lp[B:], ref[:B], ref[B:], beta)

  (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  return trainable.apply_grads(tx, state, loss, metrics, grads)


def compile_dpo(graphdef, tx, beta: float, shardings=None):
  return trainable.jit_step(functools.partial(dpo_step, graphdef, tx, beta), shardings)


def pair_accuracy(graphdef, params, ref_params, batcher: PairBatcher, pairs: Sequence[Pair]):
  """Share of `pairs` whose chosen answer gets the higher implicit reward."""
  hits = []
  for n, b in batcher.chunks(pairs):
    rows = (b["prompt"], b["prompt_mask"])
    chosen = forward.implicit_rewards(
      graphdef, params, ref_params, *rows, b["chosen"], b["chosen_mask"]
    )
    rejected = forward.implicit_rewards(
      graphdef, params, ref_params, *rows, b["rejected"], b["rejected_mask"]
    )
    hits += np.asarray(chosen > rejected)[:n].tolist()
  return float(np.mean(hits)) if hits else float("nan")


def dpo_name(cfg: Config) -> str:
  return "dpo" if cfg.dpo.pairs == "behavior" else "dpo_annotators"


def dpo(run: Run) -> None:
  """DPO from the SFT generator on behavior pairs from the logs, or on the annotators' pairs
  (`dpo.pairs`); writes models/dpo_actor (or dpo_annotators_actor) and a report beside it."""
  cfg = run.cfg
  name = dpo_name(cfg)
  if run.has_params(f"{name}_actor") or cfg.dpo.steps <= 0:
    return
  if cfg.dpo.pairs == "behavior":
    pairs, report = behavior_pairs(run.records, cfg)
  else:
    pairs = run.read_preferences()
    report = {"pairs": len(pairs)}
  train_pairs, heldout = preferences.split_heldout(pairs, cfg.dpo.heldout_fraction, cfg.seed)
  log.info("%s: %d training pairs, %d held out (%s)", name, len(train_pairs), len(heldout), report)
  batcher = PairBatcher(cfg, run.tokenizer, run.best_behavior, train_pairs, cfg.dpo.batch_size)
  compile_fn = lambda graphdef, tx, sh: compile_dpo(graphdef, tx, cfg.dpo.beta, sh)
  show = ("loss", "accuracy", "margin")
  graphdef, params, ref = trainable.train_from_sft(
    run, name, cfg.dpo.optim, cfg.dpo.steps, compile_fn, batcher, show
  )
  report["heldout_pairs"] = len(heldout)
  report["heldout_accuracy"] = pair_accuracy(graphdef, params, ref, batcher, heldout)
  run.save_params(f"{name}_actor", params)
  run.save_report(name, report)
  log.info("%s: held-out pairwise accuracy %.3f", name, report["heldout_accuracy"])
