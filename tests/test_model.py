"""The model on its own: cached decoding equals the plain forward (both decode paths); left
padding changes nothing."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from rlhb_jax.model import lora
from rlhb_jax.model.llama import Cache, LayerCache, LlamaConfig, Transformer, positions_from_mask

CFG = LlamaConfig(
  vocab_size=61,
  embed_dim=32,
  num_layers=2,
  num_heads=4,
  num_kv_heads=2,
  head_dim=8,
  mlp_dim=48,
  qkv_bias=True,
  tie_embeddings=False,
  rope_scaling=(4.0, 1.0, 4.0, 8),
)


@pytest.fixture(scope="module")
def model() -> Transformer:
  m = Transformer(CFG, rngs=nnx.Rngs(0))
  # Random (not zero) biases, so they take part in the comparisons.
  for name in ("bq", "bk", "bv"):
    p = getattr(m.layers, name)
    p.set_value(0.3 * jax.random.normal(jax.random.key(len(name)), p[...].shape))
  return m


def _batch(lengths: list[int], seed: int = 0) -> tuple[jax.Array, jax.Array]:
  rng = np.random.default_rng(seed)
  T = max(lengths)
  tokens = np.zeros((len(lengths), T), np.int32)
  mask = np.zeros((len(lengths), T), bool)
  for i, n in enumerate(lengths):
    tokens[i, T - n :] = rng.integers(1, CFG.vocab_size, n)
    mask[i, T - n :] = True
  return jnp.asarray(tokens), jnp.asarray(mask)


@nnx.jit
def _forward(model, tokens, positions, mask, cache=None):
  return model(tokens, positions, mask, cache)


def test_cached_decoding_equals_plain_forward(model):
  tokens, mask = _batch([12, 9, 4])
  full, _ = _forward(model, tokens, positions_from_mask(mask), mask)
  P = 6  # prefill the first P columns, then decode one column at a time
  cache = Cache.zeros(CFG, tokens.shape[0], tokens.shape[1])
  positions = positions_from_mask(mask)
  first, cache = _forward(model, tokens[:, :P], positions[:, :P], mask[:, :P], cache)
  steps = [first]
  for t in range(P, tokens.shape[1]):
    out, cache = _forward(
      model, tokens[:, t : t + 1], positions[:, t : t + 1], mask[:, t : t + 1], cache
    )
    steps.append(out)
  cached = jnp.concatenate(steps, axis=1)
  m = np.asarray(mask)
  np.testing.assert_allclose(np.asarray(cached)[m], np.asarray(full)[m], atol=1e-5, rtol=0)
  assert int(cache.index) == tokens.shape[1]


@pytest.mark.parametrize("adapters", [False, True])
def test_unrolled_decode_equals_the_layer_scan(adapters):
  """`Transformer.decode` (per-layer weights and cache, the sampler's CPU path) against `trunk`
  with the stacked cache, step by step after a shared prefill; adapters on and off."""
  m = Transformer(CFG, rngs=nnx.Rngs(3))
  lora.attach(m, lora.LoraConfig(rank=2, alpha=4.0), seed=1)
  for t in m.cfg.lora_targets:  # non-zero B, as after training
    b = getattr(m.layers, f"lora_{t}_b")
    b.set_value(0.2 * jax.random.normal(jax.random.key(len(t)), b[...].shape))
  tokens, mask = _batch([10, 7, 4], seed=2)
  positions = positions_from_mask(mask)
  P = 5
  cache = Cache.zeros(m.cfg, tokens.shape[0], tokens.shape[1])
  _, cache = m.trunk(tokens[:, :P], positions[:, :P], mask[:, :P], cache, adapters)
  fast = LayerCache.from_cache(cache)
  layers = m.layer_params(adapters)
  decode = jax.jit(lambda tok, pos, msk, c: m.decode(tok, pos, msk, layers, c))
  scan = jax.jit(lambda *a: m.trunk(*a, adapters=adapters))
  for t in range(P, tokens.shape[1]):
    cols = (tokens[:, t : t + 1], positions[:, t : t + 1], mask[:, t : t + 1])
    h_scan, cache = scan(*cols, cache)
    h_fast, fast = decode(*cols, fast)
    np.testing.assert_allclose(np.asarray(h_fast), np.asarray(h_scan), atol=1e-5, rtol=0)
  k, v = fast.stacked()
  np.testing.assert_allclose(np.asarray(k), np.asarray(cache.k), atol=1e-5, rtol=0)
  np.testing.assert_allclose(np.asarray(v), np.asarray(cache.v), atol=1e-5, rtol=0)
  np.testing.assert_array_equal(np.asarray(fast.mask), np.asarray(cache.mask))
  assert int(fast.index) == int(cache.index) == tokens.shape[1]


def test_left_padding_changes_nothing(model):
  tokens, mask = _batch([7, 3, 10], seed=1)
  batched, _ = _forward(model, tokens, positions_from_mask(mask), mask)
  for i in range(tokens.shape[0]):
    row = tokens[i][mask[i]][None]
    alone, _ = _forward(
      model, row, positions_from_mask(jnp.ones_like(row, bool)), jnp.ones_like(row, bool)
    )
    np.testing.assert_allclose(
      np.asarray(batched[i][mask[i]]), np.asarray(alone[0]), atol=1e-5, rtol=0
    )
