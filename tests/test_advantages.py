"""Critic-free group advantages against NumPy, and the sampler's log-probs (PPO's old policy)
against the teacher-forced forward."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from rlhb_jax.methods.ppo import advantages
from rlhb_jax.methods.ppo.config import PPOConfig
from rlhb_jax.model.config import SamplingConfig
from rlhb_jax.model.llama import LlamaConfig, Transformer
from rlhb_jax.model.sampling import sample
from rlhb_jax.training import forward


def np_rloo(r: np.ndarray, n: int, scale: bool) -> np.ndarray:
  out = np.zeros_like(r)
  for g in range(len(r) // n):
    grp = r[g * n : (g + 1) * n]
    for i in range(n):
      others = np.delete(grp, i)
      out[g * n + i] = grp[i] - others.mean()
    if scale:
      out[g * n : (g + 1) * n] /= grp.std() + 1e-6
  return out


@pytest.mark.parametrize("n,scale", [(2, False), (4, False), (4, True), (3, True)])
def test_group_baseline_matches_numpy(n, scale):
  r = np.random.default_rng(n).normal(size=4 * n).astype(np.float32)
  got = np.asarray(advantages.group_baseline(jnp.asarray(r), n, scale))
  np.testing.assert_allclose(got, np_rloo(r, n, scale), rtol=1e-5, atol=1e-6)


def test_group_advantages_credit_every_token_with_the_kl_shaped_return():
  rng = np.random.default_rng(0)
  B, T, n, beta = 8, 5, 4, 0.1
  seq = rng.normal(size=B).astype(np.float32)
  lp, ref = rng.normal(size=(2, B, T)).astype(np.float32)
  mask = (np.arange(T)[None] < rng.integers(1, T + 1, (B, 1))).astype(np.float32)
  ppo = PPOConfig(advantage="group", rollouts_per_prompt=n, kl_estimator="k1")
  out = advantages.group_advantages(jnp.asarray(seq), lp, ref, None, jnp.asarray(mask), beta, ppo)
  ret = seq - beta * ((lp - ref) * mask).sum(axis=1)
  want = np_rloo(ret, n, False)[:, None] * mask
  np.testing.assert_allclose(np.asarray(out.advantages), want, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(out.return_per_seq), ret, rtol=1e-5, atol=1e-6)
  # Rollouts of one prompt that earn the same return get no signal.
  same = advantages.group_baseline(jnp.ones(8), 4, True)
  np.testing.assert_array_equal(np.asarray(same), np.zeros(8))


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sampler_logprobs_equal_the_teacher_forced_ones(temperature):
  """make_experience takes PPO's old log-probs from the sampler instead of a second forward."""
  cfg = LlamaConfig(
    vocab_size=53, embed_dim=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, mlp_dim=48
  )
  model = Transformer(cfg, rngs=nnx.Rngs(0))
  rng = np.random.default_rng(1)
  P = 7
  prompt = rng.integers(1, 53, (4, P)).astype(np.int32)
  pmask = np.arange(P)[None] >= np.array([[0], [1], [3], [6]])
  prompt = np.where(pmask, prompt, 0)
  scfg = SamplingConfig(max_new_tokens=6, temperature=temperature)
  out = sample(model, jnp.asarray(prompt), jnp.asarray(pmask), jax.random.key(3), scfg, (2,))
  graphdef, params = nnx.split(model)
  logits = forward.policy_logits(
    graphdef, params, prompt, pmask, out.tokens, out.mask, temperature=temperature
  )
  forced = np.asarray(forward.token_logprobs(logits, out.tokens))
  m = np.asarray(out.mask)
  assert m.sum() > 4
  np.testing.assert_allclose(np.asarray(out.logprobs)[m], forced[m], atol=2e-5, rtol=1e-5)
