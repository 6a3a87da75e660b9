"""The paper's baselines' reward models: a Bradley-Terry reward model on pairwise preferences (RLHF)
and one bin classifier per behavior type (RLHBC).

Both read "{behavior} Question: {query}{context} Answer:" with an empty behavior, then the response
(the discriminator's format without the behavior text), and score the last token: the reward model
one scalar, the classifier K x N logits (K behavior types, N bins).

RLHBC maps bins back to counts at their midpoints: bin b of type k spans [e_b, e_b+1] in log1p
units, so its count per impression is expm1((e_b + e_b+1) / 2) / rate_scale when logs are binned
as rates (the default), and expm1(midpoint) when they are binned as raw counts; the impression type
itself is 1 per impression in rate mode. E[count_k] = sum_b p_kb * count_kb, and the reward is
sum_k num_k E[count_k] / sum_k den_k E[count_k] (config.reward.numerator / denominator; by default
(likes - dislikes) / (impressions + clicks)).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import pathlib
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rlhb_jax import losses, rewards, supervised
from rlhb_jax.batches import Encoder, Example, epoch_indices, left_pad, right_pad
from rlhb_jax.behavior import Binner
from rlhb_jax.config import Config
from rlhb_jax.data.validate import BadRecordError
from rlhb_jax.supervised import SupervisedState


@dataclasses.dataclass(frozen=True)
class Pair:
  query: str
  chosen: str
  rejected: str
  context: str = ""


def read_preferences(
  path: str | pathlib.Path, context_fn: Callable[[str], str] | None = None
) -> list[Pair]:
  """Pairs from a JSONL of {"query", "chosen", "rejected", "context"?}; a bad line is an error
  naming the file, the line and the field."""
  pairs = []
  with open(path, encoding="utf-8") as f:
    for i, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        row = json.loads(line)
      except json.JSONDecodeError as e:
        raise BadRecordError(str(path), i, "<line>", "json", f"invalid JSON: {e.msg}") from None
      if not isinstance(row, dict):
        raise BadRecordError(str(path), i, "<line>", "type", "expected a JSON object")
      for field in ("query", "chosen", "rejected"):
        value = row.get(field)
        if not isinstance(value, str) or not value.strip():
          kind = "missing" if value is None else "type"
          raise BadRecordError(str(path), i, field, kind, "expected a non-empty string")
      context = row.get("context")
      if context is not None and not isinstance(context, str):
        raise BadRecordError(str(path), i, "context", "type", "expected a string")
      if context is None and context_fn is not None:
        context = context_fn(row["query"])
      pairs.append(Pair(row["query"], row["chosen"], row["rejected"], context or ""))
  if not pairs:
    raise ValueError(f"{path}: no preference pairs")
  return pairs


def split_heldout(items: Sequence, fraction: float, seed: int) -> tuple[list, list]:
  """(train, held out): a seeded random `fraction` of `items` is held out."""
  order = np.random.default_rng([seed, 41]).permutation(len(items))
  n_out = int(round(fraction * len(items)))
  return [items[i] for i in order[n_out:]], [items[i] for i in order[:n_out]]


class PairBatcher:
  """Fixed-shape (prefix, chosen, rejected) batches; batch(step) is a pure function of the step."""

  def __init__(self, cfg: Config, tokenizer, pairs: Sequence[Pair], prefix_len: int, size: int):
    self.cfg, self.enc, self.pairs = cfg, Encoder(cfg, tokenizer), list(pairs)
    self.pad, self.Pd, self.size = tokenizer.pad_id, prefix_len, size

  def rows(self, pairs: Sequence[Pair]) -> dict[str, np.ndarray]:
    Tn = self.cfg.sampling.max_new_tokens
    prefix = left_pad([self.enc.prefix(p.query, "", p.context) for p in pairs], self.Pd, self.pad)
    chosen = right_pad([self.enc.response(p.chosen) for p in pairs], Tn, self.pad)
    rejected = right_pad([self.enc.response(p.rejected) for p in pairs], Tn, self.pad)
    return {
      "prefix": prefix[0],
      "prefix_mask": prefix[1],
      "chosen": chosen[0],
      "chosen_mask": chosen[1],
      "rejected": rejected[0],
      "rejected_mask": rejected[1],
    }

  def __call__(self, step: int) -> dict[str, np.ndarray]:
    idx = epoch_indices(self.cfg.seed, step, self.size, len(self.pairs), 43)
    return self.rows([self.pairs[i] for i in idx])


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


# -- steps --------------------------------------------------------------------------------------


def rm_scores(graphdef, params, batch: dict) -> tuple[jax.Array, jax.Array]:
  chosen = rewards.score(
    graphdef, params, batch["prefix"], batch["prefix_mask"], batch["chosen"], batch["chosen_mask"]
  )
  rejected = rewards.score(
    graphdef,
    params,
    batch["prefix"],
    batch["prefix_mask"],
    batch["rejected"],
    batch["rejected_mask"],
  )
  return chosen, rejected


def rm_step(graphdef, tx, state: SupervisedState, batch: dict, rng=None):
  """One Bradley-Terry step: -log sigmoid(r(chosen) - r(rejected)); skipped if non-finite."""
  del rng

  def loss_fn(params):
    return losses.bradley_terry_loss(*rm_scores(graphdef, state.full(params), batch))

  (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  return supervised.apply_grads(tx, state, loss, metrics, grads)


def classifier_logits(graphdef, params, batch: dict, num_types: int) -> jax.Array:
  tokens, mask = rewards.concat(
    batch["prefix"], batch["prefix_mask"], batch["response"], batch["response_mask"]
  )
  out = nnx.merge(graphdef, params).last_token(tokens, mask)
  return out.reshape(out.shape[0], num_types, -1)


def classifier_step(graphdef, tx, num_types: int, state: SupervisedState, batch: dict, rng=None):
  """One step of cross-entropy over every behavior type's bins."""
  del rng

  def loss_fn(params):
    logits = classifier_logits(graphdef, state.full(params), batch, num_types)
    return losses.classifier_loss(logits, batch["targets"])

  (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  return supervised.apply_grads(tx, state, loss, metrics, grads)


def compile_rm(graphdef, tx, shardings=None):
  return supervised.jit_step(functools.partial(rm_step, graphdef, tx), shardings)


def compile_classifier(graphdef, tx, num_types: int, shardings=None):
  return supervised.jit_step(functools.partial(classifier_step, graphdef, tx, num_types), shardings)


@functools.partial(jax.jit, static_argnums=0)
def _rm_correct(graphdef, params, batch):
  chosen, rejected = rm_scores(graphdef, params, batch)
  return chosen > rejected


def rm_accuracy(graphdef, params, batcher: PairBatcher, pairs: Sequence[Pair]) -> float:
  """Share of `pairs` where the reward model scores the chosen response higher."""
  correct = []
  for start in range(0, len(pairs), batcher.size):
    chunk = list(pairs[start : start + batcher.size])
    n = len(chunk)
    chunk += [chunk[0]] * (batcher.size - n)  # fixed shape
    correct += np.asarray(_rm_correct(graphdef, params, batcher.rows(chunk)))[:n].tolist()
  return float(np.mean(correct)) if correct else float("nan")


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


# -- RLHBC reward -------------------------------------------------------------------------------


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
