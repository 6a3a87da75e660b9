"""LoRA adapters: a fresh adapter changes nothing, merging changes nothing, adapters off is the
base, the split into trainable and frozen halves, and a supervised step that moves adapters only."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx
from test_model import CFG  # biases, untied head, Llama-3 RoPE scaling

from rlhb_jax.infra import sharding
from rlhb_jax.infra.checkpoint import Checkpointer
from rlhb_jax.infra.config import CheckpointConfig
from rlhb_jax.methods import sft as sft_lib
from rlhb_jax.model import build as build_lib
from rlhb_jax.model import lora
from rlhb_jax.model.heads import ScalarModel
from rlhb_jax.model.llama import Transformer, positions_from_mask
from rlhb_jax.training import trainable

SPEC = lora.LoraConfig(rank=4, alpha=8.0)


def _inputs(seed=0):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(1, CFG.vocab_size, (3, 9))
  mask = np.arange(9)[None] >= np.array([[0], [2], [5]])  # left padding
  return jnp.asarray(np.where(mask, tokens, 0)), jnp.asarray(mask)


def _logits(model, adapters=True):
  tokens, mask = _inputs()
  return np.asarray(model(tokens, positions_from_mask(mask), mask, adapters=adapters)[0])


def _randomise_b(model, scale=0.2):
  """Non-zero B matrices, as after some training."""
  for i, t in enumerate(model.cfg.lora_targets):
    b = getattr(model.layers, f"lora_{t}_b")
    b.set_value(scale * jax.random.normal(jax.random.key(100 + i), b[...].shape))


@pytest.fixture
def pair():
  """(base, adapted): the same weights, the second with adapters attached."""
  base = Transformer(CFG, rngs=nnx.Rngs(0))
  adapted = Transformer(CFG, rngs=nnx.Rngs(0))
  lora.attach(adapted, SPEC, seed=1)
  return base, adapted


def test_zero_initialised_adapters_give_the_base_logits_exactly(pair):
  base, adapted = pair
  np.testing.assert_array_equal(_logits(adapted), _logits(base))
  # ... though A is random: B = 0 is what makes the update vanish.
  assert float(jnp.abs(adapted.layers.lora_q_a[...]).max()) > 0


def test_merged_adapters_give_the_unmerged_logits(pair):
  base, adapted = pair
  _randomise_b(adapted)
  unmerged = _logits(adapted)
  assert np.abs(unmerged - _logits(base)).max() > 0.1  # the adapters matter
  params = build_lib.params_of(adapted)
  lora.merge(adapted)
  assert adapted.cfg.lora_rank == 0 and not hasattr(adapted.layers, "lora_q_a")
  np.testing.assert_allclose(_logits(adapted), unmerged, atol=1e-5, rtol=1e-5)
  # The pure-dict merge (what a stage saves) equals the in-place one.
  merged = lora.merge_params(params, SPEC.scale)
  assert not any("lora_" in k for k in merged["layers"])
  nnx.update(base, merged)
  np.testing.assert_allclose(_logits(base), unmerged, atol=1e-5, rtol=1e-5)


def test_adapters_off_is_the_base(pair):
  base, adapted = pair
  _randomise_b(adapted)
  np.testing.assert_array_equal(_logits(adapted, adapters=False), _logits(base))


def test_adapters_on_some_projections_only():
  model = Transformer(CFG, rngs=nnx.Rngs(0))
  lora.attach(model, lora.LoraConfig(rank=2, targets=("q", "v")), seed=0)
  names = {k for k in vars(model.layers) if k.startswith("lora_")}
  assert names == {"lora_q_a", "lora_q_b", "lora_v_a", "lora_v_b"}
  with pytest.raises(ValueError, match="unknown"):
    lora.LoraConfig(rank=2, targets=("qkv",))


def test_split_and_join_are_inverse_and_keep_the_head_trainable():
  model = ScalarModel(CFG, 1, rngs=nnx.Rngs(0))
  lora.attach(model.lm, SPEC, seed=0)
  params = build_lib.params_of(model)
  trainable, frozen = lora.split(params, True)
  flat = lambda t: {"/".join(map(str, p)) for p, _ in jax.tree_util.tree_flatten_with_path(t)[0]}
  assert flat(trainable) == {p for p in flat(params) if "lora_" in p or "head_" in p}
  assert flat(trainable) | flat(frozen) == flat(params)
  assert not flat(trainable) & flat(frozen)
  joined = lora.join(trainable, frozen)
  assert jax.tree.structure(joined) == jax.tree.structure(params)
  # Adapter parameters are 2 * L * r * (in + out) per target: a small share of the model.
  assert lora.count(trainable) < 0.5 * lora.count(frozen)
  # Without LoRA everything trains.
  assert lora.split(params, False) == (params, {})


def test_adapters_carry_logical_axes_that_the_rules_shard():
  model = Transformer(CFG, rngs=nnx.Rngs(0))
  lora.attach(model, SPEC, seed=0)
  axes = sharding.logical_axes(model)["layers"]
  assert axes["lora_q_a"] == ("layers", "embed", "lora")
  assert axes["lora_o_a"] == ("layers", "heads", "head_dim", "lora")
  rules = (("layers", None), ("embed", "fsdp"), ("heads", "tensor"), ("head_dim", None))
  rules += (("kv_heads", "tensor"), ("lora", None))
  assert sharding.logical_to_spec(axes["lora_q_b"], rules) == jax.sharding.PartitionSpec(
    None, None, "tensor", None
  )


def _sft_with_lora(steps=5):
  """(model, tx, frozen base, SFT state after `steps` LoRA steps, their losses)."""
  model = Transformer(CFG, rngs=nnx.Rngs(0))
  lora.attach(model, SPEC, seed=0)
  params, frozen = build_lib.split_params(model)
  tx = optax.adam(1e-2)
  step = sft_lib.compile_sft(nnx.graphdef(model), tx)
  rng = np.random.default_rng(0)
  batch = {
    "prompt": rng.integers(1, 61, (4, 6)).astype(np.int32),
    "prompt_mask": np.ones((4, 6), bool),
    "response": rng.integers(1, 61, (4, 5)).astype(np.int32),
    "response_mask": np.ones((4, 5), bool),
  }
  state = trainable.init(jax.tree.map(jnp.copy, params), tx, jax.tree.map(jnp.copy, frozen))
  losses = []
  for _ in range(steps):
    state, m = step(state, batch)
    losses.append(float(m["loss"]))
  return model, tx, frozen, state, losses


def test_sft_step_with_lora_moves_adapters_only():
  model, _, frozen, state, losses = _sft_with_lora()
  assert losses[-1] < losses[0]  # the adapters alone fit the batch
  for a, b in zip(jax.tree.leaves(frozen), jax.tree.leaves(state.frozen), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert float(jnp.abs(state.params["layers"]["lora_up_b"]).max()) > 0
  # The stage saves the merged plain model: it reproduces the adapted one's logits.
  merged = build_lib.merged_params(state.params, state.frozen, SPEC)
  plain = Transformer(CFG, rngs=nnx.Rngs(5))
  nnx.update(plain, merged)
  nnx.update(model, lora.join(state.params, state.frozen))
  np.testing.assert_allclose(_logits(plain), _logits(model), atol=1e-5, rtol=1e-5)


def test_lora_checkpoint_holds_no_base_weights_and_resumes_exactly(tmp_path):
  model, tx, frozen, state, _ = _sft_with_lora(steps=3)
  ckpt = Checkpointer(tmp_path, CheckpointConfig(async_save=False))
  ckpt.save(3, state, {"note": "lora"}, force=True)
  ckpt.close()
  with ocp.StandardCheckpointer() as reader:  # what was written: adapters and Adam moments only
    saved = reader.metadata(tmp_path / "3" / "state").item_metadata
  assert saved["frozen"] == {} and jax.tree.leaves(frozen)
  assert {k for k in saved["params"]["layers"]} == {k for k in state.params["layers"]}
  # A fresh run of the stage builds the same base and fresh adapters; restoring fills in the rest.
  params, base = build_lib.split_params(model)
  fresh = trainable.init(jax.tree.map(jnp.zeros_like, params), tx, base)
  restored, meta = Checkpointer(tmp_path, CheckpointConfig()).restore(fresh)
  assert meta == {"note": "lora"} and int(restored.step) == 3
  for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(restored), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert jax.tree.structure(restored) == jax.tree.structure(state)
