"""Offline preference optimisation straight from the behavior logs: DPO and KTO.

What a user holding likes and dislikes tries before an adversarial RL loop, on the same logs and
the same SFT start as RLHB, with the same frozen reference (the SFT generator; under LoRA its base
with adapters off):

- DPO on pairs of logged answers to one query (and search result) whose like rate per impression
  differs clearly (`config.dpo`), or on the annotators' pairwise preferences (`dpo.pairs`), so
  "DPO on behaviors" sits beside "DPO on annotators" as RLHB sits beside RLHF.
- KTO on single logged answers: desirable when their behavior bins are close to the most preferred
  ones, undesirable when close to the least preferred; each record once, no pairing needed.

Every prompt carries the most preferred behavior text, the condition the generator is evaluated
under (and RLHB's rollouts are drawn under). Losses are `losses.dpo_loss` and `losses.kto_loss`;
the steps are pure jitted functions of a `supervised.SupervisedState`.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
from collections.abc import Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from rlhb_jax import losses, steps, supervised
from rlhb_jax.baselines import Pair
from rlhb_jax.batches import Encoder, epoch_indices, left_pad, right_pad
from rlhb_jax.behavior import (
  Binner,
  least_preferred_bins,
  most_preferred_bins,
  written_columns,
)
from rlhb_jax.config import Config
from rlhb_jax.sampling import bucket_length
from rlhb_jax.supervised import SupervisedState


@dataclasses.dataclass(frozen=True)
class Labeled:
  """One logged answer marked desirable or undesirable (a KTO example)."""

  query: str
  response: str
  desirable: bool
  context: str = ""


# -- data ---------------------------------------------------------------------------------------


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
    key = (r["query"], r.get("context") or "")
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
    Labeled(r["query"], r["response"], bool(g), r.get("context") or "")
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


class _Prompted:
  """Generator prompts under the most preferred behavior, padded to one bucket for the stage."""

  def __init__(self, cfg: Config, tokenizer, behavior: str, items: Sequence, size: int):
    if not items:
      raise ValueError("no training examples for the offline stage (see its data report)")
    self.cfg, self.enc, self.behavior = cfg, Encoder(cfg, tokenizer), behavior
    self.items, self.size, self.pad = list(items), size, tokenizer.pad_id
    self.Tn = cfg.sampling.max_new_tokens
    longest = max(len(self._prompt(x)) for x in self.items)
    self.P = bucket_length(longest, cfg.sampling.prompt_buckets)

  def _prompt(self, x) -> tuple[int, ...]:
    return self.enc.prompt(x.query, self.behavior, x.context)

  def _answers(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    return right_pad([self.enc.response(t) for t in texts], self.Tn, self.pad)

  def __call__(self, step: int) -> dict[str, np.ndarray]:
    idx = epoch_indices(self.cfg.seed, step, self.size, len(self.items), 47)
    return self.rows([self.items[i] for i in idx])

  def chunks(self, items: Sequence) -> Iterable[tuple[int, dict[str, np.ndarray]]]:
    """Fixed-size batches over `items` (the last one padded by repeating its first row), each with
    its number of real rows."""
    items = list(items)
    for start in range(0, len(items), self.size):
      chunk = items[start : start + self.size]
      n = len(chunk)
      yield n, self.rows(chunk + [chunk[0]] * (self.size - n))


class PairBatcher(_Prompted):
  """(prompt, chosen, rejected) batches of DPO pairs; batch(step) is a pure function of step."""

  def rows(self, pairs: Sequence[Pair]) -> dict[str, np.ndarray]:
    prompt = left_pad([self._prompt(p) for p in pairs], self.P, self.pad)
    chosen = self._answers([p.chosen for p in pairs])
    rejected = self._answers([p.rejected for p in pairs])
    return {
      "prompt": prompt[0],
      "prompt_mask": prompt[1],
      "chosen": chosen[0],
      "chosen_mask": chosen[1],
      "rejected": rejected[0],
      "rejected_mask": rejected[1],
    }


class LabeledBatcher(_Prompted):
  """(prompt, response, desirable) batches of KTO examples."""

  def rows(self, items: Sequence[Labeled]) -> dict[str, np.ndarray]:
    prompt = left_pad([self._prompt(x) for x in items], self.P, self.pad)
    response = self._answers([x.response for x in items])
    return {
      "prompt": prompt[0],
      "prompt_mask": prompt[1],
      "response": response[0],
      "response_mask": response[1],
      "desirable": np.asarray([x.desirable for x in items], np.float32),
    }


# -- steps --------------------------------------------------------------------------------------


def sequence_logprobs(
  graphdef, params, prompt, prompt_mask, response, response_mask, adapters: bool = True
) -> jax.Array:
  """log pi(response | prompt) summed over the response mask: (B,)."""
  logits = steps.policy_logits(
    graphdef, params, prompt, prompt_mask, response, response_mask, adapters=adapters
  )
  lp = steps.token_logprobs(logits, response)
  return jnp.sum(jnp.where(response_mask, lp, 0.0), axis=1)


def reference_logprobs(graphdef, state: SupervisedState, *rows) -> jax.Array:
  """The frozen reference's sequence log-probs: the copy in `state.ref`, or under LoRA the
  model's base with adapters off."""
  if state.ref:
    lp = sequence_logprobs(graphdef, state.ref, *rows)
  else:
    lp = sequence_logprobs(graphdef, state.full(state.params), *rows, adapters=False)
  return jax.lax.stop_gradient(lp)


def _twice(x: jax.Array) -> jax.Array:
  return jnp.concatenate([x, x], axis=0)


def dpo_step(graphdef, tx, beta: float, state: SupervisedState, batch: dict, rng=None):
  """One DPO update on B pairs (chosen and rejected run as one batch of 2B rows)."""
  del rng
  B = batch["chosen"].shape[0]
  rows = (
    _twice(batch["prompt"]),
    _twice(batch["prompt_mask"]),
    jnp.concatenate([batch["chosen"], batch["rejected"]], axis=0),
    jnp.concatenate([batch["chosen_mask"], batch["rejected_mask"]], axis=0),
  )
  ref = reference_logprobs(graphdef, state, *rows)

  def loss_fn(params):
    lp = sequence_logprobs(graphdef, state.full(params), *rows)
    return losses.dpo_loss(lp[:B], lp[B:], ref[:B], ref[B:], beta)

  (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  return supervised.apply_grads(tx, state, loss, metrics, grads)


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
    _twice(prompt),
    _twice(prompt_mask),
    jnp.concatenate([resp, kl_resp], axis=0),
    jnp.concatenate([resp_mask, kl_mask], axis=0),
  )
  ref = reference_logprobs(graphdef, state, *both)
  policy_kl = jax.lax.stop_gradient(
    sequence_logprobs(graphdef, state.full(state.params), prompt, prompt_mask, kl_resp, kl_mask)
  )

  def loss_fn(params):
    lp = sequence_logprobs(graphdef, state.full(params), prompt, prompt_mask, resp, resp_mask)
    return losses.kto_loss(
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
  return supervised.apply_grads(tx, state, loss, metrics, grads)


def compile_dpo(graphdef, tx, beta: float, shardings=None):
  return supervised.jit_step(functools.partial(dpo_step, graphdef, tx, beta), shardings)


def compile_kto(graphdef, tx, cfg: Config, shardings=None):
  return supervised.jit_step(functools.partial(kto_step, graphdef, tx, cfg), shardings)


# -- held-out checks ----------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnums=0)
def implicit_rewards(graphdef, params, ref_params, prompt, prompt_mask, response, response_mask):
  """log pi(y | x) - log pi_ref(y | x) per row, both full (merged) parameter trees: (B,)."""
  rows = (prompt, prompt_mask, response, response_mask)
  return sequence_logprobs(graphdef, params, *rows) - sequence_logprobs(graphdef, ref_params, *rows)


def pair_accuracy(graphdef, params, ref_params, batcher: PairBatcher, pairs: Sequence[Pair]):
  """Share of `pairs` whose chosen answer gets the higher implicit reward."""
  hits = []
  for n, b in batcher.chunks(pairs):
    rows = (b["prompt"], b["prompt_mask"])
    chosen = implicit_rewards(graphdef, params, ref_params, *rows, b["chosen"], b["chosen_mask"])
    rejected = implicit_rewards(
      graphdef, params, ref_params, *rows, b["rejected"], b["rejected_mask"]
    )
    hits += np.asarray(chosen > rejected)[:n].tolist()
  return float(np.mean(hits)) if hits else float("nan")


def labeled_auc(graphdef, params, ref_params, batcher: LabeledBatcher, items: Sequence[Labeled]):
  """P(implicit reward of a desirable answer > that of an undesirable one) over `items` (ties
  count one half); NaN without both kinds."""
  r, label = [], []
  for n, b in batcher.chunks(items):
    rows = (b["prompt"], b["prompt_mask"], b["response"], b["response_mask"])
    out = implicit_rewards(graphdef, params, ref_params, *rows)
    r += np.asarray(out)[:n].tolist()
    label += b["desirable"][:n].tolist()
  r, label = np.asarray(r), np.asarray(label) > 0.5
  pos, neg = r[label], r[~label]
  if not len(pos) or not len(neg):
    return float("nan")
  diff = pos[:, None] - neg[None, :]
  return float(np.mean((diff > 0) + 0.5 * (diff == 0)))
