"""KTO on single logged answers, desirable or undesirable by their behavior bins: examples,
loss, step, held-out AUC and the stage.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from rlhb_jax import config as config_lib
from rlhb_jax.config import Config
from rlhb_jax.data import preferences
from rlhb_jax.data.batches import PromptedBatcher, record_context
from rlhb_jax.data.behavior import (
  Binner,
  least_preferred_bins,
  most_preferred_bins,
  written_columns,
)
from rlhb_jax.run import Run
from rlhb_jax.training import forward, trainable
from rlhb_jax.training.losses import Array, Metrics, masked_mean, to_f32
from rlhb_jax.training.trainable import SupervisedState

log = logging.getLogger(__name__)


def kto_loss(
  policy: Array,
  ref: Array,
  policy_kl: Array,
  ref_kl: Array,
  desirable: Array,
  beta: float,
  desirable_weight: float = 1.0,
  undesirable_weight: float = 1.0,
) -> tuple[Array, Metrics]:
  """Kahneman-Tversky optimisation (Ethayarajh et al., 2024), mean over (B,) single answers.

    r(x, y) = log pi(y | x) - log pi_ref(y | x)
    z0      = max(0, mean_b [log pi(y'_b | x_b) - log pi_ref(y'_b | x_b)])   (no gradient)
    v(x, y) = w_D sigmoid(beta (r - z0))   if y is desirable
              w_U sigmoid(beta (z0 - r))   if y is undesirable
    loss    = 1/B sum_b (w_b - v(x_b, y_b))

  z0 is the reference point: the policy's KL from the reference, estimated on mismatched pairs
  (x_b, y'_b), each prompt with another row's answer (`policy_kl`, `ref_kl`, (B,)).

  Metrics: kl (z0), desirable_reward and undesirable_reward (mean r of each kind; 0 if the batch
  has none), the counts of each kind.
  """
  r = to_f32(policy) - to_f32(ref)
  z0 = jax.lax.stop_gradient(jnp.maximum(jnp.mean(to_f32(policy_kl) - to_f32(ref_kl)), 0.0))
  d = to_f32(desirable) > 0.5
  value = jnp.where(
    d,
    desirable_weight * jax.nn.sigmoid(beta * (r - z0)),
    undesirable_weight * jax.nn.sigmoid(beta * (z0 - r)),
  )
  weight = jnp.where(d, desirable_weight, undesirable_weight)
  loss = jnp.mean(weight - value)
  r = jax.lax.stop_gradient(r)
  return loss, {
    "kl": z0,
    "desirable_reward": masked_mean(r, d),
    "undesirable_reward": masked_mean(r, ~d),
    "n_desirable": jnp.sum(d, dtype=jnp.float32),
    "n_undesirable": jnp.sum(~d, dtype=jnp.float32),
  }


@dataclasses.dataclass(frozen=True)
class Labeled:
  """One logged answer marked desirable or undesirable (a KTO example)."""

  query: str
  response: str
  desirable: bool
  context: str = ""


def kto_examples(
  records: Sequence[Mapping], binner: Binner, cfg: Config
) -> tuple[list[Labeled], dict]:
  """Each record once, desirable or undesirable by the distance of its written behavior bins to the
  most / least preferred ones (`kto.max_distance`, the nearer of the two wins; a tie, or neither
  close enough, leaves the record out), and a report of the counts."""
  k = cfg.kto
  cols = written_columns(cfg.behavior)
  bins = binner.bin_many(r["behavior"] for r in records)[:, cols]
  to_best = np.abs(bins - most_preferred_bins(cfg.behavior)[cols]).sum(axis=1)
  to_worst = np.abs(bins - least_preferred_bins(cfg.behavior)[cols]).sum(axis=1)
  shown = np.asarray(
    [r["behavior"].get(cfg.behavior.denominator, 0) >= k.min_impressions for r in records], bool
  )
  good = shown & (to_best <= k.max_distance) & (to_best < to_worst)
  bad = shown & (to_worst <= k.max_distance) & (to_worst < to_best)
  out = [
    Labeled(r["query"], r["response"], bool(g), record_context(r))
    for r, g, b in zip(records, good, bad, strict=True)
    if g or b
  ]
  return out, {
    "records": len(records),
    "desirable": int(good.sum()),
    "undesirable": int(bad.sum()),
    "below_min_impressions": int((~shown).sum()),
    "neither": int((shown & ~good & ~bad).sum()),
  }


def balanced_weights(items: Sequence[Labeled]) -> tuple[float, float]:
  """(w_D, w_U) with w_D n_D = w_U n_U, the commoner kind weighted 1."""
  n_good = sum(x.desirable for x in items)
  n_bad = len(items) - n_good
  if not n_good or not n_bad:
    raise ValueError(
      f"KTO needs desirable and undesirable answers; the logs give {n_good} and {n_bad} "
      "(see config.kto.max_distance)"
    )
  return max(1.0, n_bad / n_good), max(1.0, n_good / n_bad)


class LabeledBatcher(PromptedBatcher):
  """(prompt, response, desirable) batches of KTO examples."""

  def rows(self, items: Sequence[Labeled]) -> dict[str, np.ndarray]:
    return {
      **self.prompts(items),
      **self.answers("response", [x.response for x in items]),
      "desirable": np.asarray([x.desirable for x in items], np.float32),
    }


def kto_step(graphdef, tx, cfg: Config, state: SupervisedState, batch: dict, rng=None):
  """One KTO update on B labelled answers. The KL reference point pairs each prompt with the next
  row's answer (a roll of the batch), as the paper's mismatched pairs."""
  del rng
  k = cfg.kto
  prompt, prompt_mask = batch["prompt"], batch["prompt_mask"]
  resp, resp_mask = batch["response"], batch["response_mask"]
  kl_resp, kl_mask = jnp.roll(resp, 1, axis=0), jnp.roll(resp_mask, 1, axis=0)
  B = resp.shape[0]
  both = (
    forward.stack_twice(prompt),
    forward.stack_twice(prompt_mask),
    jnp.concatenate([resp, kl_resp], axis=0),
    jnp.concatenate([resp_mask, kl_mask], axis=0),
  )
  ref = forward.reference_logprobs(graphdef, state, *both)
  policy_kl = jax.lax.stop_gradient(
    forward.sequence_logprobs(
      graphdef, state.full(state.params), prompt, prompt_mask, kl_resp, kl_mask
    )
  )

  def loss_fn(params):
    lp = forward.sequence_logprobs(
      graphdef, state.full(params), prompt, prompt_mask, resp, resp_mask
    )
    return kto_loss(
      lp,
      ref[:B],
      policy_kl,
      ref[B:],
      batch["desirable"],
      k.beta,
      k.desirable_weight,
      k.undesirable_weight,
    )

  (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  return trainable.apply_grads(tx, state, loss, metrics, grads)


def compile_kto(graphdef, tx, cfg: Config, shardings=None):
  return trainable.jit_step(functools.partial(kto_step, graphdef, tx, cfg), shardings)


def labeled_auc(graphdef, params, ref_params, batcher: LabeledBatcher, items: Sequence[Labeled]):
  """P(implicit reward of a desirable answer > that of an undesirable one) over `items` (ties
  count one half); NaN without both kinds."""
  r, label = [], []
  for n, b in batcher.chunks(items):
    rows = (b["prompt"], b["prompt_mask"], b["response"], b["response_mask"])
    out = forward.implicit_rewards(graphdef, params, ref_params, *rows)
    r += np.asarray(out)[:n].tolist()
    label += b["desirable"][:n].tolist()
  r, label = np.asarray(r), np.asarray(label) > 0.5
  pos, neg = r[label], r[~label]
  if not len(pos) or not len(neg):
    return float("nan")
  diff = pos[:, None] - neg[None, :]
  return float(np.mean((diff > 0) + 0.5 * (diff == 0)))


def kto(run: Run) -> None:
  """KTO from the SFT generator on logged answers marked desirable / undesirable by their
  behavior; writes models/kto_actor and a report beside it."""
  cfg = run.cfg
  if run.has_params("kto_actor") or cfg.kto.steps <= 0:
    return
  items, report = kto_examples(run.records, run.binner, cfg)
  train_items, heldout = preferences.split_heldout(items, cfg.kto.heldout_fraction, cfg.seed)
  if cfg.kto.balance:
    w_good, w_bad = balanced_weights(train_items)
    cfg = config_lib.replace(
      cfg, **{"kto.desirable_weight": w_good, "kto.undesirable_weight": w_bad}
    )
  report["weights"] = [cfg.kto.desirable_weight, cfg.kto.undesirable_weight]
  log.info("kto: %d training answers, %d held out (%s)", len(train_items), len(heldout), report)
  batcher = LabeledBatcher(cfg, run.tokenizer, run.best_behavior, train_items, cfg.kto.batch_size)
  show = ("loss", "kl", "desirable_reward", "undesirable_reward")
  graphdef, params, ref = trainable.train_from_sft(
    run,
    "kto",
    cfg.kto.optim,
    cfg.kto.steps,
    lambda graphdef, tx, sh: compile_kto(graphdef, tx, cfg, sh),
    batcher,
    show,
  )
  report["heldout_answers"] = len(heldout)
  report["heldout_auc"] = labeled_auc(graphdef, params, ref, batcher, heldout)
  run.save_params("kto_actor", params)
  run.save_report("kto", report)
  log.info("kto: held-out desirable-vs-undesirable AUC %.3f", report["heldout_auc"])
