"""DPO and KTO from the logs: data selection, the reference, and learning a known preference."""

import jax
import numpy as np
import pytest
from flax import nnx
from test_baselines import ByteTokenizer, synthetic_pairs
from test_baselines import tiny_config as baseline_config

from rlhb_jax import config as C
from rlhb_jax.data import preferences
from rlhb_jax.data.behavior import BehaviorConfig, Binner
from rlhb_jax.methods import dpo as dpo_lib
from rlhb_jax.methods import kto as kto_lib
from rlhb_jax.model import build as build_lib
from rlhb_jax.model import lora
from rlhb_jax.training import forward, optim, trainable
from rlhb_jax.training.config import OptimConfig

V = 64
BEST = "Users: most liked it."


def tiny_config(**changes):
  return baseline_config(**{"sampling.prompt_buckets": (64, 128), **changes})


def record(query, response, impressions, likes, dislikes=0, context=""):
  behavior = {"impressions": impressions, "clicks": 0, "likes": likes, "dislikes": dislikes}
  return {"query": query, "response": response, "context": context, "behavior": behavior}


# -- data selection --------------------------------------------------------------------------


def test_behavior_pairs_pick_clear_gaps_and_pool_repeated_answers():
  cfg = C.replace(C.Config(), **{"dpo.min_gap": 0.2, "dpo.min_impressions": 10})
  records = [
    record("q1", "good", 20, 12),  # pooled with the next one: 16 / 40 = 0.4
    record("q1", "good", 20, 4),
    record("q1", "bad", 50, 5),  # 0.1: gap 0.3 to "good"
    record("q1", "close", 100, 35),  # 0.35: gap 0.05 to "good" (too small), 0.25 to "bad"
    record("q1", "rare", 5, 5),  # 1.0 but shown 5 times: not eligible
    record("q2", "a", 10, 5),  # no second answer
    record("q3", "x", 10, 9, context="c1"),  # different contexts are different questions
    record("q3", "y", 10, 0, context="c2"),
  ]
  pairs, report = dpo_lib.behavior_pairs(records, cfg)
  assert pairs == [
    preferences.Pair("q1", "good", "bad"),
    preferences.Pair("q1", "close", "bad"),
  ]
  assert report == {
    "records": 8,
    "queries": 4,
    "answers_below_min_impressions": 1,
    "candidate_pairs": 2,
    "queries_with_pairs": 1,
    "pairs": 2,
  }
  capped = C.replace(cfg, **{"dpo.max_pairs_per_query": 1})
  assert dpo_lib.behavior_pairs(records, capped)[0] == [preferences.Pair("q1", "good", "bad")]


def test_kto_examples_label_by_distance_to_the_preferred_bins():
  bcfg = BehaviorConfig(num_bins=5)
  cfg = C.replace(C.Config(behavior=bcfg), **{"kto.max_distance": 1, "kto.min_impressions": 10})
  binner = Binner(bcfg, dict.fromkeys(bcfg.names, 0.0), dict.fromkeys(bcfg.names, np.log1p(100)))
  rows = [
    # (impressions, clicks, likes, dislikes, requeries) in percent of 100 impressions
    (100, 100, 100, 0, 0),  # the most preferred bins exactly: desirable
    (100, 100, 20, 0, 0),  # likes one bin down: distance 1, desirable
    (100, 0, 0, 100, 100),  # the least preferred: undesirable
    (100, 20, 20, 20, 20),  # in the middle: neither
    (5, 100, 100, 0, 0),  # shown 5 times: left out
  ]
  records = [
    {"query": f"q{i}", "response": f"r{i}", "behavior": dict(zip(bcfg.names, r, strict=True))}
    for i, r in enumerate(rows)
  ]
  items, report = kto_lib.kto_examples(records, binner, cfg)
  assert [(x.response, x.desirable) for x in items] == [("r0", True), ("r1", True), ("r2", False)]
  assert report == {
    "records": 5,
    "desirable": 2,
    "undesirable": 1,
    "below_min_impressions": 1,
    "neither": 1,
  }


# -- learning --------------------------------------------------------------------------------


def _policy(cfg, rank):
  """A tiny generator with (rank > 0) fresh LoRA adapters: (graphdef, trainable, frozen, ref)."""
  model, _ = build_lib.build_lm(cfg.model, V, 0)
  plain = nnx.graphdef(model)
  start = jax.tree.map(np.array, build_lib.params_of(model))  # a copy: the step donates its state
  spec = lora.LoraConfig(rank=rank, alpha=2.0 * rank) if rank else lora.LoraConfig()
  build_lib.with_lora(model, spec, 0)
  params, frozen = build_lib.split_params(model)
  ref = jax.tree.map(np.array, params) if not rank else None
  return plain, nnx.graphdef(model), spec, start, params, frozen, ref


@pytest.mark.parametrize("rank", [0, 4])
def test_dpo_learns_a_known_preference(rank):
  """Held-out pairwise accuracy of the implicit reward must reach 0.9 (0.5 by chance); at step 0
  the policy is its own reference, so the loss is log 2 exactly."""
  cfg = tiny_config()
  plain, graphdef, spec, start, params, frozen, ref = _policy(cfg, rank)
  train, heldout = preferences.split_heldout(synthetic_pairs(400, 0), 0.2, 0)
  batcher = dpo_lib.PairBatcher(cfg, ByteTokenizer(), BEST, train, 16)
  opt_cfg = OptimConfig(learning_rate=3e-3 if rank else 1e-3, warmup_steps=5)
  tx = optim.make_optimizer(opt_cfg, 80)
  step = dpo_lib.compile_dpo(graphdef, tx, 0.5)
  state = trainable.init(params, tx, frozen, ref)
  state, first = step(state, batcher(0))
  np.testing.assert_allclose(float(first["loss"]), np.log(2.0), rtol=1e-5)
  assert abs(float(first["margin"])) < 1e-6
  for s in range(1, 80):
    state, m = step(state, batcher(s))
  merged = build_lib.merged_params(state.params, state.frozen, spec)
  acc = dpo_lib.pair_accuracy(plain, merged, start, batcher, heldout)
  assert acc >= 0.9, acc
  assert float(m["accuracy"]) >= 0.9 and float(m["loss"]) < np.log(2.0)


@pytest.mark.parametrize("rank", [0, 4])
def test_kto_learns_desirable_from_undesirable(rank):
  """Held-out AUC of the implicit reward between desirable and undesirable answers >= 0.9."""
  cfg = tiny_config(**{"kto.beta": 0.5})
  plain, graphdef, spec, start, params, frozen, ref = _policy(cfg, rank)
  items = [
    kto_lib.Labeled(p.query, answer, good)
    for p in synthetic_pairs(300, 1)
    for answer, good in ((p.chosen, True), (p.rejected, False))
  ]
  items = [items[i] for i in np.random.default_rng(0).permutation(len(items))]
  train, heldout = preferences.split_heldout(items, 0.2, 0)
  batcher = kto_lib.LabeledBatcher(cfg, ByteTokenizer(), BEST, train, 16)
  opt_cfg = OptimConfig(learning_rate=3e-3 if rank else 1e-3, warmup_steps=5)
  tx = optim.make_optimizer(opt_cfg, 80)
  step = kto_lib.compile_kto(graphdef, tx, cfg)
  state = trainable.init(params, tx, frozen, ref)
  state, first = step(state, batcher(0))
  # The policy is its reference: r = z0 = 0 and every row's loss is w (1 - sigmoid(0)) = 0.5.
  np.testing.assert_allclose(float(first["loss"]), 0.5, rtol=1e-5)
  assert abs(float(first["kl"])) < 1e-6
  for s in range(1, 80):
    state, m = step(state, batcher(s))
  merged = build_lib.merged_params(state.params, state.frozen, spec)
  auc = kto_lib.labeled_auc(plain, merged, start, batcher, heldout)
  assert auc >= 0.9, auc
  assert float(m["desirable_reward"]) > float(m["undesirable_reward"])


def test_lora_reference_is_the_base_with_adapters_off():
  """Under LoRA the reference log-probs ignore the adapters: equal to the plain model's, while
  the policy's move once the adapters are non-zero."""
  cfg = tiny_config()
  plain, graphdef, spec, start, params, frozen, _ = _policy(cfg, 4)
  params = jax.tree_util.tree_map_with_path(
    lambda path, x: x + 0.05 if "lora" in jax.tree_util.keystr(path) else x, params
  )
  state = trainable.init(params, optim.make_optimizer(OptimConfig(), 1), frozen)
  batcher = dpo_lib.PairBatcher(cfg, ByteTokenizer(), BEST, synthetic_pairs(16, 2), 16)
  b = batcher(0)
  rows = (b["prompt"], b["prompt_mask"], b["chosen"], b["chosen_mask"])
  ref = forward.reference_logprobs(graphdef, state, *rows)
  base = forward.sequence_logprobs(plain, start, *rows)
  policy = forward.sequence_logprobs(graphdef, state.full(state.params), *rows)
  np.testing.assert_allclose(np.asarray(ref), np.asarray(base), rtol=1e-5, atol=1e-5)
  assert np.max(np.abs(np.asarray(policy) - np.asarray(base))) > 1e-3


def test_balanced_kto_weights():
  items = [kto_lib.Labeled("q", "a", True)] * 2 + [kto_lib.Labeled("q", "b", False)] * 6
  assert kto_lib.balanced_weights(items) == (3.0, 1.0)
  assert kto_lib.balanced_weights(items[1:3]) == (1.0, 1.0)
  with pytest.raises(ValueError, match="desirable and undesirable"):
    kto_lib.balanced_weights(items[:2])
