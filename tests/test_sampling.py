"""`rlhb_jax.model.sampling` against an independent reference: the uncached forward on the growing
sequence. The reference rows are unpadded on the left (right-padded to one width, which a causal
model cannot see), so it shares neither the KV cache nor the left-padding path with `sample`.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from rlhb_jax.data.batches import pad_prompts
from rlhb_jax.model.config import SamplingConfig
from rlhb_jax.model.llama import LlamaConfig, Transformer
from rlhb_jax.model.sampling import sample, sample_jit

CFG = LlamaConfig(
  vocab_size=64, embed_dim=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, mlp_dim=64
)
PROMPTS = [[5, 9, 11, 3, 7], [8, 2], [13, 14, 15, 16, 17, 18, 19], [40, 41, 42]]
TN = 8  # new tokens per row
BUCKETS = (8, 16)
NO_EOS = (-1,)  # an id the model never emits


class LM:
  """The tiny model, split for `sample_jit`, with a jitted uncached forward as the reference."""

  def __init__(self):
    model = Transformer(CFG, rngs=nnx.Rngs(0))
    # At init the residual branches are tiny and the tied head mostly repeats the last token; larger
    # branches make the logits depend on the whole context, so a wrong cache cannot go unnoticed.
    for w in (model.layers.wo, model.layers.w_down):
      w[...] = w[...] * 8.0
    for w in (model.layers.wq, model.layers.wk):
      w[...] = w[...] * 2.0
    self.graphdef, self.params = nnx.split(model)

    @jax.jit
    def forward(tokens, mask):  # rows are right-padded: a token's position is its index
      positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
      logits, _ = nnx.merge(self.graphdef, self.params)(tokens, positions, mask)
      return logits

    self._forward = forward

  def sample(self, prompts, key=0, buckets=BUCKETS, eos_ids=NO_EOS, pad_id=0, **kw):
    cfg = SamplingConfig(max_new_tokens=TN, prompt_buckets=buckets, **kw)
    tokens, mask = pad_prompts(prompts, buckets, 0)
    out = sample_jit(
      self.graphdef,
      self.params,
      tokens,
      mask,
      jax.random.key(key),
      cfg=cfg,
      eos_ids=eos_ids,
      pad_id=pad_id,
    )
    return jax.device_get(out)

  def rows(self, seqs):
    """Uncached logits (len(s), V) f64 of each unpadded row; one fixed width, so one compilation."""
    width = max(BUCKETS) + TN
    tokens = np.zeros((len(seqs), width), np.int32)
    mask = np.zeros((len(seqs), width), bool)
    for i, s in enumerate(seqs):
      tokens[i, : len(s)], mask[i, : len(s)] = s, True
    logits = np.asarray(self._forward(tokens, mask), np.float64)
    return [logits[i, : len(s)] for i, s in enumerate(seqs)]

  def teacher_forced(self, prompts, continuations):
    """Reference logits (B, TN, V) that chose each continuation token."""
    seqs = [list(p) + list(c) for p, c in zip(prompts, continuations, strict=True)]
    rows = self.rows(seqs)
    return np.stack([r[len(p) - 1 : len(p) - 1 + TN] for r, p in zip(rows, prompts, strict=True)])

  def greedy(self, prompts):
    """Reference greedy decoding: re-run the full forward on the growing sequence, take argmax."""
    seqs = [list(p) for p in prompts]
    for _ in range(TN):
      for s, logits in zip(seqs, self.rows(seqs), strict=True):
        s.append(int(logits[-1].argmax()))
    tokens = np.asarray([s[len(p) :] for s, p in zip(seqs, prompts, strict=True)])
    return tokens, self.teacher_forced(prompts, tokens)


def log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def chosen(logp, tokens):
  return np.take_along_axis(logp, tokens[..., None], -1)[..., 0]


@pytest.fixture(scope="module")
def lm():
  return LM()


@pytest.fixture(scope="module")
def reference(lm):
  """Greedy reference tokens (B, TN) and the logits (B, TN, V) that chose them."""
  return lm.greedy(PROMPTS)


@pytest.mark.parametrize("decode_layers", ["unroll", "scan"])
def test_greedy_equals_uncached_reference_loop(lm, reference, decode_layers):
  ref_tokens, ref_logits = reference
  assert len(set(ref_tokens.ravel().tolist())) > 5  # the model says something, not one token
  out = lm.sample(PROMPTS, greedy=True, decode_layers=decode_layers)
  np.testing.assert_array_equal(out.tokens, ref_tokens)
  np.testing.assert_allclose(out.logprobs, chosen(log_softmax(ref_logits), ref_tokens), atol=1e-4)
  assert out.mask.all()


def test_temperature_sampling_is_keyed_and_logprobs_are_tempered(lm):
  a = lm.sample(PROMPTS, key=3, temperature=2.5)
  b = lm.sample(PROMPTS, key=3, temperature=2.5)
  c = lm.sample(PROMPTS, key=4, temperature=2.5)
  np.testing.assert_array_equal(a.tokens, b.tokens)
  np.testing.assert_array_equal(a.logprobs, b.logprobs)
  assert (a.tokens != c.tokens).any()
  ref = lm.teacher_forced(PROMPTS, a.tokens)
  np.testing.assert_allclose(a.logprobs, chosen(log_softmax(ref / 2.5), a.tokens), atol=1e-4)
  # The tempered log-probs differ from the untempered ones, so the check above is not vacuous.
  assert np.abs(chosen(log_softmax(ref), a.tokens) - a.logprobs).max() > 0.1


def test_top_k_one_and_tiny_top_p_are_greedy(lm, reference):
  ref_tokens, _ = reference
  np.testing.assert_array_equal(lm.sample(PROMPTS, key=1, top_k=1).tokens, ref_tokens)
  np.testing.assert_array_equal(lm.sample(PROMPTS, key=1, top_p=1e-6).tokens, ref_tokens)


def test_top_k_samples_stay_in_the_top_k(lm):
  k, prompts = 4, PROMPTS * 8  # 32 rows x 8 steps = 256 samples in one call
  out = lm.sample(prompts, key=7, top_k=k, temperature=1.5)
  ref = lm.teacher_forced(prompts, out.tokens)
  rank = (ref > chosen(ref, out.tokens)[..., None]).sum(-1)  # 0 = the argmax
  assert rank.max() < k
  assert rank.max() == k - 1  # all of the top k do get picked: this is not greedy decoding
  # Log-probs are of the tempered, unfiltered distribution (what the PPO update recomputes).
  np.testing.assert_allclose(out.logprobs, chosen(log_softmax(ref / 1.5), out.tokens), atol=1e-4)


def test_top_p_samples_stay_in_the_nucleus(lm):
  top_p, prompts = 0.5, PROMPTS * 8
  out = lm.sample(prompts, key=8, top_p=top_p)
  probs = np.exp(log_softmax(lm.teacher_forced(prompts, out.tokens)))
  p_chosen = chosen(probs, out.tokens)
  mass_above = np.where(probs > p_chosen[..., None], probs, 0.0).sum(-1)
  # A token is in the nucleus iff the mass of the tokens more likely than it is below top_p.
  assert mass_above.max() < top_p + 1e-5
  assert (mass_above > 0).any()  # not greedy either


def test_eos_ends_a_row(lm, reference):
  ref_tokens, ref_logits = reference
  # An id that one row emits (first) mid-way while another row never emits it.
  eos = next(
    int(t)
    for row in ref_tokens
    for step, t in enumerate(row[1:-1], 1)
    if t not in row[:step] and (ref_tokens != t).all(axis=1).any()
  )
  pad = 63 if eos != 63 else 62
  out = lm.sample(PROMPTS, greedy=True, eos_ids=(-5, eos), pad_id=pad)
  ref_logp = chosen(log_softmax(ref_logits), ref_tokens)
  ended = 0
  for i, row in enumerate(ref_tokens):
    hits = np.flatnonzero(row == eos)
    end = hits[0] + 1 if hits.size else TN  # the EOS token itself is part of the completion
    ended += bool(hits.size)
    np.testing.assert_array_equal(out.mask[i], np.arange(TN) < end)
    np.testing.assert_array_equal(out.tokens[i, :end], row[:end])
    np.testing.assert_allclose(out.logprobs[i, :end], ref_logp[i, :end], atol=1e-4)
    assert (out.tokens[i, end:] == pad).all() and (out.logprobs[i, end:] == 0).all()
  assert 0 < ended < len(PROMPTS)


def test_left_padding_to_a_larger_bucket_changes_nothing(lm, reference):
  ref_tokens, _ = reference
  small = lm.sample(PROMPTS, greedy=True, buckets=(8,))
  big = lm.sample(PROMPTS, greedy=True, buckets=(32,))
  np.testing.assert_array_equal(big.tokens, ref_tokens)
  np.testing.assert_array_equal(big.tokens, small.tokens)
  np.testing.assert_allclose(big.logprobs, small.logprobs, atol=1e-5)


def test_new_batches_in_the_same_bucket_do_not_recompile(lm):
  cfg = SamplingConfig(max_new_tokens=TN, temperature=0.7, prompt_buckets=BUCKETS)
  traces = []

  @functools.partial(jax.jit, static_argnames="cfg")
  def counted(params, tokens, mask, rng, cfg):
    traces.append(1)  # runs only when jax traces, i.e. compiles
    return sample(nnx.merge(lm.graphdef, params), tokens, mask, rng, cfg, NO_EOS)

  batches = [PROMPTS, [[1, 2, 3], [4, 5, 6, 7, 8], [9], [10] * 8]]
  outs = []
  for key, prompts in enumerate(batches):
    tokens, mask = pad_prompts(prompts, BUCKETS, 0)
    outs.append(counted(lm.params, tokens, mask, jax.random.key(key), cfg=cfg))
    sample_jit(lm.graphdef, lm.params, tokens, mask, jax.random.key(key), cfg=cfg, eos_ids=NO_EOS)
    if key == 0:
      compiled = sample_jit._cache_size()
  assert len(traces) == 1
  assert sample_jit._cache_size() == compiled
  assert (np.asarray(outs[0].tokens) != np.asarray(outs[1].tokens)).any()  # it did run both


def test_pad_prompts_left_pads_to_the_bucket():
  tokens, mask = pad_prompts([[1] * 5, [2] * 9], (16, 8), pad_id=7)
  np.testing.assert_array_equal(tokens[0], [7] * 11 + [1] * 5)
  np.testing.assert_array_equal(tokens[1], [7] * 7 + [2] * 9)
  np.testing.assert_array_equal(mask, tokens != 7)
  assert tokens.dtype == np.int32 and mask.dtype == bool
  assert pad_prompts([[3] * 8], (8, 16), 0)[0].shape == (1, 8)  # an exact fit stays in its bucket
  with pytest.raises(ValueError, match="largest bucket 16"):
    pad_prompts([[1] * 17, [1]], (8, 16), 0)
