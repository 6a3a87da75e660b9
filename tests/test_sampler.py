"""Sampler invariants against the uncached forward: greedy, log-probs, keys, EOS, no recompiles."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from rlhb_jax.config import SamplingConfig
from rlhb_jax.model.llama import LlamaConfig, Transformer, positions_from_mask
from rlhb_jax.sampling import pad_prompts, sample_jit

CFG = LlamaConfig(
  vocab_size=64, embed_dim=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, mlp_dim=64
)
PROMPTS = [[5, 9, 11, 3, 7], [8, 2], [13, 14, 15, 16, 17, 18, 19]]


@pytest.fixture(scope="module")
def split():
  model = Transformer(CFG, rngs=nnx.Rngs(0))
  # Sharper logits than the default init, so greedy choices are not near-ties.
  model.embed[...] = model.embed[...] * 4.0
  return nnx.split(model)


def run(split, prompts, key=0, **kw):
  graphdef, params = split
  cfg = SamplingConfig(max_new_tokens=6, prompt_buckets=(8, 16), **kw)
  tokens, mask = pad_prompts(prompts, cfg.prompt_buckets, 0)
  out = sample_jit(graphdef, params, tokens, mask, jax.random.key(key), cfg=cfg, eos_ids=(-1,))
  return jax.device_get(out)


def reference_logits(split, prompt, continuation):
  """Logits after each continuation prefix, from the plain (uncached) forward on one unpadded
  row."""
  model = nnx.merge(*split)
  seq = jnp.asarray([list(prompt) + list(continuation)])
  mask = jnp.ones(seq.shape, bool)
  logits, _ = model(seq, positions_from_mask(mask), mask)
  P = len(prompt)
  return np.asarray(logits[0, P - 1 : P - 1 + len(continuation)])


def test_greedy_matches_uncached_argmax_and_logprobs(split):
  out = run(split, PROMPTS, greedy=True)
  for i, prompt in enumerate(PROMPTS):
    ref = reference_logits(split, prompt, out.tokens[i])
    np.testing.assert_array_equal(out.tokens[i], ref.argmax(-1))
    logp = jax.nn.log_softmax(ref, -1)[np.arange(6), out.tokens[i]]
    np.testing.assert_allclose(out.logprobs[i], logp, atol=1e-4)
  assert out.mask.all()


def test_temperature_sampling_is_reproducible_and_logprobs_are_tempered(split):
  a = run(split, PROMPTS, key=3, temperature=2.5)
  b = run(split, PROMPTS, key=3, temperature=2.5)
  c = run(split, PROMPTS, key=4, temperature=2.5)
  np.testing.assert_array_equal(a.tokens, b.tokens)
  assert (a.tokens != c.tokens).any()
  for i, prompt in enumerate(PROMPTS):
    ref = reference_logits(split, prompt, a.tokens[i]) / 2.5
    logp = jax.nn.log_softmax(ref, -1)[np.arange(6), a.tokens[i]]
    np.testing.assert_allclose(a.logprobs[i], logp, atol=1e-4)


def test_top_k_one_and_tiny_top_p_are_greedy(split):
  greedy = run(split, PROMPTS, greedy=True).tokens
  np.testing.assert_array_equal(run(split, PROMPTS, key=1, top_k=1).tokens, greedy)
  np.testing.assert_array_equal(run(split, PROMPTS, key=1, top_p=1e-6).tokens, greedy)


def test_top_k_stays_in_the_top_k(split):
  for key in range(5):
    out = run(split, PROMPTS, key=key, top_k=3)
    for i, prompt in enumerate(PROMPTS):
      ref = reference_logits(split, prompt, out.tokens[i])
      top3 = np.argsort(-ref, -1)[:, :3]
      assert all(t in row for t, row in zip(out.tokens[i], top3, strict=True))


def test_eos_ends_the_row(split):
  graphdef, params = split
  greedy = run(split, PROMPTS, greedy=True).tokens
  eos = int(greedy[0, 2])  # row 0 emits it at step 2 (maybe also earlier)
  cfg = SamplingConfig(max_new_tokens=6, greedy=True, prompt_buckets=(8, 16))
  tokens, mask = pad_prompts(PROMPTS, cfg.prompt_buckets, 0)
  out = jax.device_get(
    sample_jit(graphdef, params, tokens, mask, jax.random.key(0), cfg=cfg, eos_ids=(eos,), pad_id=0)
  )
  for i in range(len(PROMPTS)):
    hits = np.flatnonzero(greedy[i] == eos)
    end = hits[0] + 1 if hits.size else 6
    np.testing.assert_array_equal(out.mask[i], np.arange(6) < end)
    np.testing.assert_array_equal(out.tokens[i, :end], greedy[i, :end])
    assert (out.tokens[i, end:] == 0).all() and (out.logprobs[i, end:] == 0).all()


def test_left_padding_to_a_larger_bucket_changes_nothing(split):
  small = run(split, PROMPTS, greedy=True)
  graphdef, params = split
  cfg = SamplingConfig(max_new_tokens=6, greedy=True, prompt_buckets=(32,))
  tokens, mask = pad_prompts(PROMPTS, cfg.prompt_buckets, 0)
  big = sample_jit(graphdef, params, tokens, mask, jax.random.key(0), cfg=cfg, eos_ids=(-1,))
  np.testing.assert_array_equal(small.tokens, np.asarray(big.tokens))


def test_new_prompts_in_the_same_bucket_do_not_recompile(split):
  run(split, PROMPTS, greedy=True)
  before = sample_jit._cache_size()
  run(split, [[1, 2, 3], [4, 5, 6, 7, 8], [9]], greedy=True)
  run(split, [[10] * 8, [11], [12, 13]], greedy=True)
  assert sample_jit._cache_size() == before


def test_pad_prompts_buckets():
  tokens, mask = pad_prompts([[1] * 5, [2] * 9], (8, 16), 0)
  assert tokens.shape == (2, 16) and mask.sum(1).tolist() == [5, 9]
  assert mask[0, -5:].all() and not mask[0, :-5].any()
  with pytest.raises(ValueError, match="largest bucket 16"):
    pad_prompts([[1] * 17], (8, 16), 0)
