"""RLHBC's behavior classifier: a scalar model predicting each behavior type's bin of a
(query, response); its expected behavior under the most preferred bins is the PPO reward."""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from rlhb_jax.config import Config
from rlhb_jax.data import preferences
from rlhb_jax.data.batches import Encoder, Example, epoch_indices, left_pad, right_pad
from rlhb_jax.data.behavior import Binner
from rlhb_jax.methods.reward_model import train_scorer
from rlhb_jax.model import build as build_lib
from rlhb_jax.run import Run
from rlhb_jax.training import forward, trainable
from rlhb_jax.training.losses import Array, Metrics, to_f32
from rlhb_jax.training.trainable import SupervisedState

log = logging.getLogger(__name__)


def classifier_loss(logits: Array, targets: Array) -> tuple[Array, Metrics]:
  """Behavior classifier loss: mean cross-entropy over B examples and M heads of N bins each.

    loss = -1/(B M) sum_{b,m} log softmax(logits_bm)[targets_bm],   logits (B, M, N), targets (B, M)

  Metrics: accuracy (argmax == target, the mean of the per-head accuracies).
  """
  logits = to_f32(logits)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
  correct = jnp.argmax(jax.lax.stop_gradient(logits), axis=-1) == targets
  return jnp.mean(ce), {"accuracy": jnp.mean(correct)}


class ClassifierBatcher:
  """(prefix, response, bins) batches of logged examples for the behavior classifier."""

  def __init__(
    self, cfg: Config, tokenizer, examples: Sequence[Example], bins: np.ndarray, prefix_len: int
  ):
    self.cfg, self.enc, self.examples = cfg, Encoder(cfg, tokenizer), list(examples)
    self.bins, self.pad, self.Pd = np.asarray(bins, np.int32), tokenizer.pad_id, prefix_len

  def rows(self, idx: Sequence[int]) -> dict[str, np.ndarray]:
    exs = [self.examples[i] for i in idx]
    prefix = left_pad([self.enc.prefix(e.query, "", e.context) for e in exs], self.Pd, self.pad)
    resp = right_pad(
      [self.enc.response(e.response) for e in exs], self.cfg.sampling.max_new_tokens, self.pad
    )
    return {
      "prefix": prefix[0],
      "prefix_mask": prefix[1],
      "response": resp[0],
      "response_mask": resp[1],
      "targets": self.bins[np.asarray(idx)],
    }

  def __call__(self, step: int) -> dict[str, np.ndarray]:
    size = self.cfg.reward.classifier_batch_size
    return self.rows(epoch_indices(self.cfg.seed, step, size, len(self.examples), 43))


def classifier_logits(graphdef, params, batch: dict, num_types: int) -> jax.Array:
  tokens, mask = forward.concat(
    batch["prefix"], batch["prefix_mask"], batch["response"], batch["response_mask"]
  )
  out = nnx.merge(graphdef, params).last_token(tokens, mask)
  return out.reshape(out.shape[0], num_types, -1)


def classifier_step(graphdef, tx, num_types: int, state: SupervisedState, batch: dict, rng=None):
  """One step of cross-entropy over every behavior type's bins."""
  del rng

  def loss_fn(params):
    logits = classifier_logits(graphdef, state.full(params), batch, num_types)
    return classifier_loss(logits, batch["targets"])

  (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  return trainable.apply_grads(tx, state, loss, metrics, grads)


def compile_classifier(graphdef, tx, num_types: int, shardings=None):
  return trainable.jit_step(functools.partial(classifier_step, graphdef, tx, num_types), shardings)


@functools.partial(jax.jit, static_argnums=(0, 3))
def _cls_pred(graphdef, params, batch, num_types):
  return jnp.argmax(classifier_logits(graphdef, params, batch, num_types), axis=-1)


def classifier_accuracy(graphdef, params, batcher: ClassifierBatcher, idx: Sequence[int]) -> dict:
  """Per-type bin accuracy of the classifier on examples `idx`."""
  size = batcher.cfg.reward.classifier_batch_size
  k = batcher.bins.shape[1]
  hits = []
  for start in range(0, len(idx), size):
    chunk = list(idx[start : start + size])
    n = len(chunk)
    chunk += [chunk[0]] * (size - n)
    batch = batcher.rows(chunk)
    pred = np.asarray(_cls_pred(graphdef, params, batch, k))[:n]
    hits.append(pred == batch["targets"][:n])
  acc = np.concatenate(hits).mean(axis=0)
  return dict(zip(batcher.cfg.behavior.names, map(float, acc), strict=True))


def bin_counts(binner: Binner) -> np.ndarray:
  """Count per impression at the midpoint of every bin, float32 (K, N) (module docstring)."""
  cfg = binner.config
  n = cfg.num_bins
  out = np.zeros((len(binner.names), n), np.float64)
  for k, name in enumerate(binner.names):
    edges = np.linspace(binner.lo[k], binner.hi[k], n + 1)
    x = np.expm1((edges[:-1] + edges[1:]) / 2)
    if cfg.normalize_by_impressions:
      x = np.ones(n) if name == cfg.denominator else x / cfg.rate_scale
    out[k] = x
  return out.astype(np.float32)


def formula_weights(cfg: Config) -> tuple[np.ndarray, np.ndarray]:
  """The RLHBC formula as weight vectors over `behavior.names`: (numerator, denominator)."""
  names = cfg.behavior.names

  def vec(terms):
    v = np.zeros(len(names), np.float32)
    for name, w in terms:
      v[names.index(name)] += w
    return v

  return vec(cfg.reward.numerator), vec(cfg.reward.denominator)


def behavior_classifier(run: Run) -> None:
  """RLHBC's classifier: one head of N bins per behavior type on (query, response)."""
  cfg = run.cfg
  if run.has_params("behavior_classifier") or cfg.reward.classifier_steps <= 0:
    return
  actor = run.actor_model(prefer=("sft_actor",))
  k, n = len(cfg.behavior.names), cfg.behavior.num_bins
  clf = build_lib.build_disc(cfg, actor, run.tokenizer.vocab_size, k * n, seed_offset=4)
  bins = run.binner.bin_many(r["behavior"] for r in run.records)
  idx = list(range(len(run.examples)))
  train_idx, heldout_idx = preferences.split_heldout(idx, cfg.reward.rm_heldout_fraction, cfg.seed)
  train_b = ClassifierBatcher(
    cfg,
    run.tokenizer,
    [run.examples[i] for i in train_idx],
    bins[train_idx],
    run.batcher.Pd,
  )
  graphdef, params = train_scorer(
    run,
    "behavior_classifier",
    clf,
    cfg.reward.classifier_optim,
    cfg.reward.classifier_steps,
    lambda graphdef, tx, sh: compile_classifier(graphdef, tx, k, sh),
    train_b,
  )
  all_b = ClassifierBatcher(cfg, run.tokenizer, run.examples, bins, run.batcher.Pd)
  report = {
    "heldout_bin_accuracy": classifier_accuracy(graphdef, params, all_b, heldout_idx),
    "majority_bin_accuracy": {
      name: float(np.mean(bins[heldout_idx, j] == np.bincount(bins[train_idx, j]).argmax()))
      for j, name in enumerate(cfg.behavior.names)
    },
  }
  run.save_params("behavior_classifier", params)
  run.save_report("behavior_classifier", report)
  log.info("behavior classifier: held-out bin accuracy %s", report["heldout_bin_accuracy"])


def frozen_classifier(run: Run, cfg: Config, actor) -> tuple[Any, dict]:
  """The trained behavior classifier of the run and what RLHBC's formula needs beside it."""
  k, n = len(cfg.behavior.names), cfg.behavior.num_bins
  clf = build_lib.build_disc(cfg, actor, run.tokenizer.vocab_size, k * n, seed_offset=4)
  params = run.load_params("behavior_classifier", clf)
  if params is None:
    raise FileNotFoundError(
      f"{run.workdir}/models/behavior_classifier: run mode=behavior_classifier first"
    )
  nnx.update(clf, params)
  num, den = formula_weights(cfg)
  return clf, {"bin_counts": bin_counts(run.binner), "num": num, "den": den}
