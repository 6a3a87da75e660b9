"""RLHF's reward model and RLHBC's classifier reward: learning, formula, inputs, the PPO step."""

import dataclasses
import json

import jax
import numpy as np
import pytest
from flax import nnx
from shapes import TINY_MODEL

from rlhb_jax import config as C
from rlhb_jax.data import preferences
from rlhb_jax.data.behavior import BehaviorConfig, Binner
from rlhb_jax.data.validate import BadRecordError
from rlhb_jax.infra import sharding
from rlhb_jax.methods import classifier as classifier_lib
from rlhb_jax.methods import reward_model as rm_lib
from rlhb_jax.methods.ppo import rewards
from rlhb_jax.methods.ppo import state as ppo_state
from rlhb_jax.methods.ppo import step as ppo_step
from rlhb_jax.model import build as build_lib
from rlhb_jax.training import optim, trainable

V = 64


class ByteTokenizer:
  eos_ids = (1,)
  pad_id = 0

  def encode(self, text):
    return [b % 60 + 4 for b in text.encode()][:60]

  def chat_prompt(self, message, system=""):
    return [2, *self.encode(message), 3]


def tiny_config(**changes):
  base = {
    **TINY_MODEL,
    "sampling.max_new_tokens": 8,
    "reward.rm_optim.learning_rate": 3e-3,
    "reward.rm_optim.warmup_steps": 5,
  }
  return C.replace(C.Config(), **(base | changes))


def synthetic_pairs(n, seed):
  """Chosen answers start with "yes", rejected ones with "no"; the rest is random filler."""
  rng = np.random.default_rng(seed)
  words = ["sun", "rain", "tree", "river", "stone", "cloud", "bird", "road", "lamp", "door"]
  pairs = []
  for _ in range(n):
    q = " ".join(rng.choice(words, 3))
    fill = lambda: " ".join(rng.choice(words, rng.integers(1, 3)))  # noqa: E731
    a, b = f"yes {fill()}", f"no {fill()}"
    pairs.append(preferences.Pair(q, a, b))
  return pairs


def test_reward_model_learns_a_known_preference():
  """Held-out pairwise accuracy must reach 0.9 (a random RM scores about 0.5)."""
  cfg = tiny_config()
  actor, _ = build_lib.build_lm(cfg.model, V, 0)
  rm = build_lib.build_disc(cfg, actor, V, seed_offset=3)
  graphdef, params = nnx.graphdef(rm), build_lib.params_of(rm)
  pairs = synthetic_pairs(400, 0)
  train, heldout = preferences.split_heldout(pairs, 0.2, 0)
  assert len(heldout) == 80 and not set(map(id, train)) & set(map(id, heldout))
  batcher = rm_lib.PairBatcher(cfg, ByteTokenizer(), train, prefix_len=48, size=16)
  before = rm_lib.rm_accuracy(graphdef, params, batcher, heldout)
  tx = optim.make_optimizer(cfg.reward.rm_optim, 80)
  step = rm_lib.compile_rm(graphdef, tx)
  state = trainable.init(params, tx)
  for s in range(80):
    state, m = step(state, batcher(s))
  after = rm_lib.rm_accuracy(graphdef, state.params, batcher, heldout)
  assert after >= 0.9, (before, after)
  assert float(m["loss"]) < 0.3


def test_bin_counts_map_bins_back_to_counts_per_impression():
  cfg = BehaviorConfig(num_bins=2)
  names = cfg.names  # impressions, clicks, likes, dislikes, requeries
  lo = dict.fromkeys(names, 0.0)
  hi = dict.fromkeys(names, float(np.log1p(100.0)))
  counts = classifier_lib.bin_counts(Binner(cfg, lo, hi))
  mids = np.expm1(np.log1p(100.0) * np.array([0.25, 0.75]))
  np.testing.assert_allclose(counts[0], [1.0, 1.0])  # impressions: 1 per impression
  for k in range(1, len(names)):
    np.testing.assert_allclose(counts[k], mids / 100.0, rtol=1e-6)
  raw = classifier_lib.bin_counts(
    Binner(BehaviorConfig(num_bins=2, normalize_by_impressions=False), lo, hi)
  )
  np.testing.assert_allclose(raw[0], mids, rtol=1e-6)


def test_classifier_reward_formula_on_known_inputs():
  # Types: impressions, clicks, likes, dislikes, requeries; 3 bins each, counts per impression.
  bin_counts = np.array(
    [[1, 1, 1], [0.0, 0.1, 0.4], [0.0, 0.2, 0.5], [0.0, 0.1, 0.3], [0.0, 0.2, 0.6]], np.float32
  )
  cfg = tiny_config()
  num, den = classifier_lib.formula_weights(cfg)
  np.testing.assert_array_equal(num, [0, 0, 1, -1, 0])
  np.testing.assert_array_equal(den, [1, 1, 0, 0, 0])
  sure = lambda bins: np.stack([np.eye(3)[b] * 60.0 for b in bins])  # noqa: E731
  logits = np.stack([sure([0, 2, 2, 0, 0]), sure([0, 0, 1, 2, 1])])
  r = np.asarray(rewards.classifier_reward(logits, bin_counts, num, den))
  # (0.5 - 0) / (1 + 0.4) and (0.2 - 0.3) / (1 + 0)
  np.testing.assert_allclose(r, [0.5 / 1.4, -0.1], rtol=1e-5)
  # A uniform classifier: expected counts are the bin means.
  e = bin_counts.mean(axis=1)
  uniform = np.asarray(rewards.classifier_reward(np.zeros((1, 5, 3)), bin_counts, num, den))
  np.testing.assert_allclose(uniform, [(e[2] - e[3]) / (e[0] + e[1])], rtol=1e-5)
  # The formula is configuration.
  cfg2 = tiny_config(**{"reward.numerator": (("likes", 2.0),), "reward.denominator": ()})
  num2, den2 = classifier_lib.formula_weights(cfg2)
  np.testing.assert_array_equal(num2, [0, 0, 2, 0, 0])
  assert not den2.any()


def test_formula_names_must_be_behavior_types():
  with pytest.raises(ValueError, match="'stars' is not a behavior type"):
    tiny_config(**{"reward.numerator": (("stars", 1.0),)})


def test_bad_preference_lines_name_file_line_and_field(tmp_path):
  path = tmp_path / "prefs.jsonl"
  good = {"query": "q", "chosen": "a", "rejected": "b"}
  path.write_text(json.dumps(good) + "\n" + json.dumps({**good, "rejected": 3}) + "\n")
  with pytest.raises(BadRecordError) as e:
    preferences.read_preferences(path)
  assert (e.value.line, e.value.field) == (2, "rejected") and str(path) in str(e.value)
  path.write_text(json.dumps(good) + "\n{oops\n")
  with pytest.raises(BadRecordError, match=":2:"):
    preferences.read_preferences(path)
  path.write_text(json.dumps(good) + "\n")
  (pair,) = preferences.read_preferences(path, context_fn=lambda q: f"ctx {q}")
  assert pair == preferences.Pair("q", "a", "b", "ctx q")


@pytest.mark.parametrize("source", ["rm", "classifier", "disc+rm"])
def test_ppo_step_with_each_reward_source(source):
  """The RLHB step machinery with a frozen RM / classifier: the reward is the model's score."""
  from test_steps import Bp, Pd, make_batch, small_config

  cfg = C.replace(small_config(), **{"reward.source": source})
  if not rewards.uses_disc(cfg):
    cfg = C.replace(cfg, **{"disc.updates_per_step": 0})
  actor, _ = build_lib.build_lm(cfg.model, 64, 0)
  critic = build_lib.scalar_from_lm(actor, 1, 1)
  disc = build_lib.build_disc(cfg, actor, 64)
  k, n = len(cfg.behavior.names), cfg.behavior.num_bins
  outputs = k * n if source == "classifier" else 1
  rm = build_lib.build_disc(cfg, actor, 64, outputs, seed_offset=3)
  rm.head_w[...] = 0.5 * jax.random.normal(jax.random.key(3), rm.head_w[...].shape)
  classifier = None
  if source == "classifier":
    counts = np.tile(np.linspace(0, 0.5, n, dtype=np.float32), (k, 1))
    counts[0] = 1.0
    num, den = classifier_lib.formula_weights(cfg)
    classifier = {"bin_counts": counts, "num": num, "den": den}
  mesh = sharding.make_mesh(cfg.mesh, jax.devices()[:1])
  rl_roles, state, _ = ppo_state.init_state(
    cfg, actor, critic, disc, (1,), 0, mesh, rm=rm, classifier=classifier
  )
  rm_before = jax.tree.map(np.asarray, state.rm)
  batch = make_batch(0)
  rng = np.random.default_rng(1)
  batch["rm_prefix"] = rng.integers(5, 64, (Bp, Pd)).astype(np.int32)
  batch["rm_prefix_mask"] = np.ones((Bp, Pd), bool)
  step = jax.jit(lambda s, b, r: ppo_step.train_step(rl_roles, cfg, s, b, r))
  new, metrics = step(state, batch, jax.random.key(0))
  new, metrics = step(new, batch, jax.random.key(0))  # step 0 has learning rate 0 (warm-up)
  assert np.isfinite(float(metrics["reward_mean"]))
  assert ("d_fake_rollout" in metrics) == (source == "disc+rm")
  if source != "disc+rm":
    assert float(metrics["reward_mean"]) == pytest.approx(float(metrics["rm_reward_mean"]))
  # The reward model is frozen; the discriminator trains only when it gives reward.
  for a, b in zip(jax.tree.leaves(new.rm), jax.tree.leaves(rm_before), strict=True):
    np.testing.assert_array_equal(np.asarray(a), b)
  disc_same = all(
    np.array_equal(np.asarray(a), np.asarray(b))
    for a, b in zip(jax.tree.leaves(new.disc), jax.tree.leaves(state.disc), strict=True)
  )
  assert disc_same == (source != "disc+rm")


def test_ppo_step_with_the_simulator_reward():
  """reward.source=sim: the host oracle sees the step's rollouts with each prompt's query index
  repeated over its n rollouts, and its values are the reward; D is not trained."""
  from test_steps import Bp, make_batch, small_config

  cfg = C.replace(small_config(), **{"reward.source": "sim", "disc.updates_per_step": 0})
  n = cfg.ppo.rollouts_per_prompt
  seen = []

  def oracle(tokens, mask, index):
    seen.append((np.asarray(tokens), np.asarray(mask), np.asarray(index)))
    return (np.asarray(mask).sum(1) + 0.1 * np.asarray(index)).astype(np.float32)

  actor, _ = build_lib.build_lm(cfg.model, 64, 0)
  critic = build_lib.scalar_from_lm(actor, 1, 1)
  disc = build_lib.build_disc(cfg, actor, 64)
  mesh = sharding.make_mesh(cfg.mesh, jax.devices()[:1])
  rl_roles, state, _ = ppo_state.init_state(cfg, actor, critic, disc, (1,), 0, mesh, oracle=oracle)
  batch = make_batch(0)
  batch["query_index"] = np.arange(Bp, dtype=np.int32) * 3
  new, metrics = jax.jit(lambda s, b, r: ppo_step.train_step(rl_roles, cfg, s, b, r))(
    state, batch, jax.random.key(0)
  )
  tokens, mask, index = seen[-1]
  np.testing.assert_array_equal(index, np.repeat(batch["query_index"], n))
  assert tokens.shape == mask.shape == (Bp * n, cfg.sampling.max_new_tokens)
  expected = (mask.sum(1) + 0.1 * index).mean()
  assert float(metrics["reward_mean"]) == pytest.approx(expected, rel=1e-6)
  assert float(metrics["sim_reward_mean"]) == pytest.approx(expected, rel=1e-6)
  for a, b in zip(jax.tree.leaves(new.disc), jax.tree.leaves(state.disc), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_sim_oracle_is_the_simulated_users_like_rate():
  """The oracle decodes live, non-EOS tokens like evaluation does and returns the simulator's
  expected like rate: a right answer beats a refusal."""
  from types import SimpleNamespace

  from rlhb_jax.methods.ppo.stages import SimOracle
  from rlhb_jax.sim.simulator import Simulator

  class CharTokenizer:
    eos_ids = (1,)

    def decode(self, ids):
      return "".join(chr(i) for i in ids)

  sim = Simulator(seed=0)
  query = sim.queries("train")[5]
  texts = [" " + sim.context(query), " Sorry, I cannot help with that."]
  width = max(len(t) for t in texts) + 3
  tokens = np.zeros((2, width), np.int32)
  mask = np.zeros((2, width), bool)
  for i, t in enumerate(texts):
    ids = [ord(c) for c in t] + [1]
    tokens[i, : len(ids)], mask[i, : len(ids)] = ids, True
  tokens[:, -1] = ord("x")  # after EOS: not live, never read
  run = SimpleNamespace(tokenizer=CharTokenizer(), simulator=sim)
  out = SimOracle(run, ["unused", query])(tokens, mask, np.array([1, 1]))
  want = [sim.expected_rates(query, t)["like"] for t in texts]
  np.testing.assert_allclose(out, want, rtol=1e-6)
  assert out[0] > out[1] + 0.2
  # mode=online sets the round: the users of that round score (after the drift, another mix).
  drifting = Simulator(dataclasses.replace(sim.config, drift_round=1), seed=0)
  run = SimpleNamespace(tokenizer=CharTokenizer(), simulator=drifting)
  oracle = SimOracle(run, ["unused", query])
  before = oracle(tokens, mask, np.array([1, 1]))
  oracle.round = 1
  after = oracle(tokens, mask, np.array([1, 1]))
  np.testing.assert_allclose(after, [drifting.expected_rates(query, t, 1)["like"] for t in texts])
  assert np.abs(after - before).max() > 1e-3
