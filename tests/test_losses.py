"""rlhb_jax.training.losses against plain NumPy references, and the properties PPO relies on."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhb_jax.methods import classifier as classifier_lib
from rlhb_jax.methods import dpo as dpo_lib
from rlhb_jax.methods import kto as kto_lib
from rlhb_jax.methods import reward_model as rm_lib
from rlhb_jax.training import losses

RTOL, ATOL = 1e-5, 1e-6
B, T, V = 5, 7, 11


def _close(actual, expected, rtol=RTOL, atol=ATOL):
  np.testing.assert_allclose(np.asarray(actual), np.asarray(expected), rtol=rtol, atol=atol)


def _ragged_mask(lengths=(7, 4, 1, 0, 5), t=T) -> np.ndarray:
  """Right-padded completion mask, including a fully masked row (length 0)."""
  return (np.arange(t)[None, :] < np.asarray(lengths)[:, None]).astype(np.float32)


@pytest.fixture
def rng():
  return np.random.default_rng(0)


# ----------------------------------------------------------------------------- NumPy references


def np_masked_mean(x, m):
  x, m = np.asarray(x, np.float64), np.asarray(m, np.float64)
  total = 0.0
  count = 0.0
  for xi, mi in zip(x.ravel(), m.ravel(), strict=True):
    if mi:
      total += xi * mi
      count += mi
  return total / (count + 1e-8)


def np_masked_var(x, m):
  mean = np_masked_mean(x, m)
  return np_masked_mean((np.asarray(x, np.float64) - mean) ** 2, m)


def np_gae(rewards, values, lengths, gamma, lam):
  """Row by row, reversed loop over the first `length` tokens; bootstrap value 0 at the end."""
  adv = np.zeros_like(rewards, dtype=np.float64)
  for b, n in enumerate(lengths):
    running = 0.0
    for t in reversed(range(n)):
      next_value = values[b, t + 1] if t + 1 < n else 0.0
      delta = rewards[b, t] + gamma * next_value - values[b, t]
      running = delta + gamma * lam * running
      adv[b, t] = running
  returns = np.zeros_like(adv)
  for b, n in enumerate(lengths):
    returns[b, :n] = adv[b, :n] + values[b, :n]
  return adv, returns


def np_log_softmax(z):
  z = np.asarray(z, np.float64)
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def np_sigmoid(z):
  return 1.0 / (1.0 + np.exp(-np.asarray(z, np.float64)))


# ----------------------------------------------------------------------------- masked statistics


def test_masked_mean_var_match_numpy_and_ignore_masked_nans(rng):
  x = rng.normal(size=(B, T)).astype(np.float32)
  mask = _ragged_mask()
  x_poisoned = np.where(mask > 0, x, np.nan).astype(np.float32)
  _close(losses.masked_mean(x_poisoned, mask), np_masked_mean(x, mask))
  _close(losses.masked_var(x_poisoned, mask), np_masked_var(x, mask))
  n = mask.sum()
  _close(losses.masked_var(x_poisoned, mask, unbiased=True), np_masked_var(x, mask) * n / (n - 1))
  per_row = losses.masked_mean(x_poisoned, mask.astype(bool), axis=1)
  _close(per_row, [np_masked_mean(x[b], mask[b]) for b in range(B)])
  assert float(per_row[3]) == 0.0  # the fully masked row: 0, not NaN
  assert float(losses.masked_mean(x, np.zeros_like(mask))) == 0.0


def test_masked_whiten(rng):
  x = (3.0 + 2.0 * rng.normal(size=(B, T))).astype(np.float32)
  mask = _ragged_mask()
  mean, var = np_masked_mean(x, mask), np_masked_var(x, mask)
  expected = np.where(mask > 0, (x - mean) / np.sqrt(var + 1e-8), 0.0)
  out = losses.masked_whiten(x, mask)
  _close(out, expected, atol=1e-5)
  _close(np_masked_mean(out, mask), 0.0, atol=1e-5)
  _close(np_masked_var(out, mask), 1.0, rtol=1e-4)
  kept = losses.masked_whiten(x, mask, shift_mean=False)
  _close(kept, np.where(mask > 0, expected + mean, 0.0), atol=1e-5)


# ----------------------------------------------------------------------------- GAE


@pytest.mark.parametrize("gamma,lam", [(0.99, 0.95), (1.0, 1.0), (0.9, 0.0)])
def test_gae_matches_reversed_loop(rng, gamma, lam):
  lengths = (7, 4, 1, 0, 5)
  mask = _ragged_mask(lengths)
  rewards = rng.normal(size=(B, T)).astype(np.float32)
  values = rng.normal(size=(B, T)).astype(np.float32)
  # Garbage beyond the response must not be read.
  rewards_p = np.where(mask > 0, rewards, 1e6).astype(np.float32)
  values_p = np.where(mask > 0, values, np.nan).astype(np.float32)
  adv, ret = losses.gae(rewards_p, values_p, mask, gamma, lam)
  ref_adv, ref_ret = np_gae(rewards, values, lengths, gamma, lam)
  _close(adv, ref_adv, atol=1e-5)
  _close(ret, ref_ret, atol=1e-5)
  assert np.all(np.asarray(adv)[mask == 0] == 0.0)
  assert np.all(np.isfinite(np.asarray(adv)))


def test_gae_undiscounted_is_reward_to_go_minus_value(rng):
  lengths = (7, 4, 1, 0, 5)
  mask = _ragged_mask(lengths)
  rewards = rng.normal(size=(B, T)).astype(np.float32)
  values = rng.normal(size=(B, T)).astype(np.float32)
  adv, ret = losses.gae(rewards, values, mask, 1.0, 1.0)
  rtg = np.zeros((B, T))
  for b, n in enumerate(lengths):
    rtg[b, :n] = np.cumsum(rewards[b, :n][::-1])[::-1]
  _close(adv, np.where(mask > 0, rtg - values, 0.0), atol=1e-5)
  _close(ret, rtg, atol=1e-5)  # with lam = 1 the return is the Monte Carlo return


def test_gae_skips_holes_in_the_mask(rng):
  """A masked position in the middle is skipped: same as GAE on the compacted sequence."""
  rewards = rng.normal(size=(1, T)).astype(np.float32)
  values = rng.normal(size=(1, T)).astype(np.float32)
  mask = np.array([[1, 1, 0, 0, 1, 1, 0]], np.float32)
  keep = mask[0] > 0
  adv, ret = losses.gae(rewards, values, mask, 0.9, 0.8)
  ref_adv, ref_ret = np_gae(rewards[:, keep], values[:, keep], [int(keep.sum())], 0.9, 0.8)
  _close(np.asarray(adv)[:, keep], ref_adv, atol=1e-5)
  _close(np.asarray(ret)[:, keep], ref_ret, atol=1e-5)
  assert np.all(np.asarray(adv)[:, ~keep] == 0.0)


# ----------------------------------------------------------------------------- KL and token rewards


def test_kl_estimators(rng):
  logp = rng.normal(size=(B, T)).astype(np.float32) - 2.0
  ref = (logp + rng.normal(size=(B, T))).astype(np.float32)
  d = logp.astype(np.float64) - ref
  _close(losses.kl_penalty(logp, ref, "k1"), d)
  _close(losses.kl_penalty(logp, ref, "k2"), 0.5 * d**2)
  r = np.exp(ref.astype(np.float64) - logp)
  k3 = losses.kl_penalty(logp, ref, "k3")
  _close(k3, (r - 1.0) - np.log(r), atol=1e-5)
  assert np.all(np.asarray(k3) >= 0.0)
  # Near rho = 1 the estimator must stay >= 0 (expm1, no cancellation to negative values).
  tiny = np.float32(1e-4) * rng.normal(size=(B, T)).astype(np.float32)
  assert np.all(np.asarray(losses.kl_penalty(logp, logp + tiny, "k3")) >= 0.0)
  _close(losses.kl_penalty(logp, logp, "k3"), np.zeros((B, T)))
  with pytest.raises(ValueError, match="estimator"):
    losses.kl_penalty(logp, ref, "k4")


@pytest.mark.parametrize("estimator", ["k1", "k3"])
def test_token_rewards(rng, estimator):
  lengths = (7, 4, 1, 0, 5)
  mask = _ragged_mask(lengths)
  seq_reward = rng.normal(size=(B,)).astype(np.float32)
  logp = rng.normal(size=(B, T)).astype(np.float32) - 2.0
  ref = (logp + 0.3 * rng.normal(size=(B, T))).astype(np.float32)
  beta = 0.1
  rewards, kl = losses.token_rewards(seq_reward, logp, ref, mask, beta, estimator)
  exp_rewards, exp_kl = np.zeros((B, T)), np.zeros((B, T))
  for b, n in enumerate(lengths):
    for t in range(n):
      d = float(logp[b, t]) - float(ref[b, t])
      exp_kl[b, t] = d if estimator == "k1" else np.expm1(-d) + d
      exp_rewards[b, t] = -beta * exp_kl[b, t] + (seq_reward[b] if t == n - 1 else 0.0)
  _close(kl, exp_kl, atol=1e-5)
  _close(rewards, exp_rewards, atol=1e-5)
  assert np.all(np.asarray(rewards)[3] == 0.0)  # the empty row gets nothing


def test_update_kl_coef():
  # Observed KL twice the target: error clipped to +0.2.
  _close(losses.update_kl_coef(0.1, 12.0, 6.0, 10000.0, 256), 0.1 * (1 + 0.2 * 256 / 10000))
  # Observed KL half the target: error clipped to -0.2.
  _close(losses.update_kl_coef(0.1, 3.0, 6.0, 10000.0, 256), 0.1 * (1 - 0.2 * 256 / 10000))
  # Inside the band: proportional.
  _close(losses.update_kl_coef(0.1, 6.6, 6.0, 1000.0, 64), 0.1 * (1 + 0.1 * 64 / 1000))
  _close(losses.update_kl_coef(0.1, 6.0, 6.0, 1000.0, 64), 0.1)


def test_reward_from_disc_and_normalize(rng):
  z = (3.0 * rng.normal(size=(B,))).astype(np.float32)
  _close(losses.reward_from_disc(z, "prob"), np_sigmoid(z))
  _close(losses.reward_from_disc(z, "log"), np.log(np_sigmoid(z)), atol=1e-5)
  _close(losses.reward_from_disc(z, "logit"), z)
  assert np.isfinite(float(losses.reward_from_disc(np.float32(-200.0), "log")))
  _close(losses.normalize_rewards(z, "none"), z)
  _close(losses.normalize_rewards(z, "center"), z - z.mean(), atol=1e-5)
  _close(losses.normalize_rewards(z, "whiten"), (z - z.mean()) / z.std(), atol=1e-5)
  _close(losses.normalize_rewards(np.ones(4, np.float32), "whiten"), np.zeros(4))
  with pytest.raises(ValueError):
    losses.reward_from_disc(z, "exp")
  with pytest.raises(ValueError):
    losses.normalize_rewards(z, "rank")


# ----------------------------------------------------------------------------- PPO


def np_ppo_policy_loss(logp, old, adv, mask, eps, dual):
  total, count, clipped_count = 0.0, 0.0, 0.0
  for b in range(logp.shape[0]):
    for t in range(logp.shape[1]):
      if not mask[b, t]:
        continue
      ratio = np.exp(float(logp[b, t]) - float(old[b, t]))
      a = float(adv[b, t])
      surrogate = min(ratio * a, min(max(ratio, 1 - eps), 1 + eps) * a)
      loss = -surrogate
      if dual > 0 and a < 0:
        loss = min(loss, -dual * a)
      clipped_count += float(min(max(ratio, 1 - eps), 1 + eps) * a < ratio * a)
      total += loss
      count += 1
  return total / (count + 1e-8), clipped_count / (count + 1e-8)


@pytest.mark.parametrize("dual_clip", [0.0, 3.0])
def test_ppo_policy_loss_matches_numpy(rng, dual_clip):
  mask = _ragged_mask()
  old = rng.normal(size=(B, T)).astype(np.float32) - 2.0
  logp = (old + 0.8 * rng.normal(size=(B, T))).astype(np.float32)  # many ratios outside the range
  adv = rng.normal(size=(B, T)).astype(np.float32)
  loss, metrics = losses.ppo_policy_loss(logp, old, adv, mask, 0.2, dual_clip)
  ref_loss, ref_clip_frac = np_ppo_policy_loss(logp, old, adv, mask, 0.2, dual_clip)
  _close(loss, ref_loss)
  _close(metrics["clip_frac"], ref_clip_frac)
  assert 0.0 < float(metrics["clip_frac"]) < 1.0
  log_ratio = logp.astype(np.float64) - old
  _close(metrics["approx_kl"], np_masked_mean(np.expm1(log_ratio) - log_ratio, mask), rtol=1e-4)
  if dual_clip:
    assert float(metrics["dual_clip_frac"]) > 0.0


def test_ppo_gradient_is_zero_where_clipped():
  eps = 0.2
  old = np.zeros((1, 6), np.float32)
  # ratios: 1.5 (A>0, clipped), 0.5 (A<0, clipped), 1.1 (inside), 1.5 (A<0, not clipped),
  # 0.5 (A>0, not clipped), 5.0 (A<0: dual clip at c=3 binds).
  logp = np.log(np.array([[1.5, 0.5, 1.1, 1.5, 0.5, 5.0]], np.float32))
  adv = np.array([[1.0, -1.0, 2.0, -1.0, 1.0, -1.0]], np.float32)
  mask = np.ones((1, 6), np.float32)

  def loss_fn(lp, dual):
    return losses.ppo_policy_loss(lp, old, adv, mask, eps, dual)[0]

  grad = np.asarray(jax.grad(loss_fn)(jnp.asarray(logp), 3.0))[0]
  ratio = np.exp(logp[0])
  # d/dlogp of -A * ratio / n where the unclipped term is active.
  expected = np.array([0.0, 0.0, -2.0 * ratio[2], 1.0 * ratio[3], -1.0 * ratio[4], 0.0]) / 6
  _close(grad, expected)
  # Without dual clip the last token (ratio 5, A < 0) has a gradient again.
  grad_no_dual = np.asarray(jax.grad(loss_fn)(jnp.asarray(logp), 0.0))[0]
  _close(grad_no_dual[5], ratio[5] / 6)


def test_dual_clip_bounds_loss_by_c_times_abs_advantage():
  old = np.zeros((1, 1), np.float32)
  adv = np.array([[-2.0]], np.float32)
  mask = np.ones((1, 1), np.float32)
  logp = np.log(np.array([[10.0]], np.float32))  # ratio 10 > c = 3
  loss, metrics = losses.ppo_policy_loss(logp, old, adv, mask, 0.2, 3.0)
  _close(loss, 3.0 * 2.0)  # bounded by -c * A = 6 instead of -ratio * A = 20
  _close(metrics["dual_clip_frac"], 1.0)
  loss_plain, _ = losses.ppo_policy_loss(logp, old, adv, mask, 0.2, 0.0)
  _close(loss_plain, 20.0, rtol=1e-5)
  # Positive advantages are never dual-clipped.
  loss_pos, _ = losses.ppo_policy_loss(logp, old, -adv, mask, 0.2, 3.0)
  _close(loss_pos, -1.2 * 2.0)
  with pytest.raises(ValueError, match="dual_clip"):
    losses.ppo_policy_loss(logp, old, adv, mask, 0.2, 0.5)


def test_ppo_fully_masked_batch_is_finite(rng):
  x = rng.normal(size=(B, T)).astype(np.float32)
  mask = np.zeros((B, T), np.float32)
  loss, metrics = losses.ppo_policy_loss(x, x * 0, x, mask, 0.2, 3.0)
  grad = jax.grad(lambda lp: losses.ppo_policy_loss(lp, x * 0, x, mask, 0.2, 3.0)[0])(x)
  assert float(loss) == 0.0 and np.all(np.asarray(grad) == 0.0)
  assert all(np.isfinite(float(v)) for v in metrics.values())


def test_value_loss_matches_numpy_and_clips(rng):
  mask = _ragged_mask()
  old = rng.normal(size=(B, T)).astype(np.float32)
  values = (old + 0.5 * rng.normal(size=(B, T))).astype(np.float32)
  returns = rng.normal(size=(B, T)).astype(np.float32)
  eps = 0.2
  total, count, n_clip = 0.0, 0.0, 0.0
  for b in range(B):
    for t in range(T):
      if mask[b, t]:
        v, o, r = float(values[b, t]), float(old[b, t]), float(returns[b, t])
        vc = min(max(v, o - eps), o + eps)
        total += 0.5 * max((v - r) ** 2, (vc - r) ** 2)
        n_clip += float((vc - r) ** 2 > (v - r) ** 2)
        count += 1
  loss, metrics = losses.value_loss(values, old, returns, mask, eps)
  _close(loss, total / count)
  _close(metrics["clip_frac"], n_clip / count)
  assert 0.0 < float(metrics["clip_frac"]) < 1.0
  plain, _ = losses.value_loss(values, old, returns, mask, 0.0)
  _close(plain, 0.5 * np_masked_mean((values - returns.astype(np.float64)) ** 2, mask))

  # Gradient: zero where the clipped term wins, (v - R) / n elsewhere.
  old1 = np.zeros((1, 3), np.float32)
  v1 = np.array([[1.0, 1.0, 0.1]], np.float32)
  r1 = np.array([[-1.0, 2.0, 0.0]], np.float32)
  grad = jax.grad(lambda v: losses.value_loss(v, old1, r1, np.ones((1, 3)), 0.2)[0])(v1)
  # token 0: |0.2 - (-1)| = 1.2 < |1 - (-1)| = 2, the unclipped term wins.
  # token 1: |0.2 - 2| = 1.8 > |1 - 2| = 1, the clipped term wins -> zero gradient.
  # token 2: inside the clip range, both terms equal.
  _close(np.asarray(grad)[0], np.array([2.0, 0.0, 0.1]) / 3)


def test_entropy_from_logits(rng):
  logits = (2.0 * rng.normal(size=(B, T, V))).astype(np.float32)
  mask = _ragged_mask()
  logp = np_log_softmax(logits)
  ent = -(np.exp(logp) * logp).sum(-1)
  _close(losses.entropy_from_logits(logits, mask), np_masked_mean(ent, mask))
  _close(losses.entropy_from_logits(np.zeros((1, 2, V)), np.ones((1, 2))), np.log(V))
  # bf16 logits are computed in f32.
  bf16 = jnp.asarray(logits, jnp.bfloat16)
  ref = np_log_softmax(np.asarray(bf16.astype(jnp.float32)))
  _close(
    losses.entropy_from_logits(bf16, mask),
    np_masked_mean(-(np.exp(ref) * ref).sum(-1), mask),
    rtol=1e-5,
  )
  # Banned (-inf) tokens: finite value and gradient, and the same entropy as without them.
  banned = logits.copy()
  banned[..., :3] = -np.inf
  val, grad = jax.value_and_grad(losses.entropy_from_logits)(jnp.asarray(banned), mask)
  logp_b = np_log_softmax(logits[..., 3:])
  _close(val, np_masked_mean(-(np.exp(logp_b) * logp_b).sum(-1), mask))
  assert np.all(np.isfinite(np.asarray(grad)))


def test_explained_variance(rng):
  mask = _ragged_mask()
  returns = rng.normal(size=(B, T)).astype(np.float32)
  values = (returns + 0.5 * rng.normal(size=(B, T))).astype(np.float32)
  expected = 1.0 - np_masked_var(returns - values, mask) / np_masked_var(returns, mask)
  _close(losses.explained_variance(values, returns, mask), expected, rtol=1e-4)
  _close(losses.explained_variance(returns, returns, mask), 1.0)
  mean_pred = np.full_like(returns, np_masked_mean(returns, mask))
  _close(losses.explained_variance(mean_pred, returns, mask), 0.0, atol=1e-5)


# ----------------------------------------------------------------------- discriminator, RM, CM, SFT


def np_bce(z, y):
  z = np.asarray(z, np.float64)
  return -(y * np.log(np_sigmoid(z)) + (1 - y) * np.log(np_sigmoid(-z)))


def test_disc_loss_known_inputs():
  logits = np.array([2.0, -1.0, 0.5, -3.0], np.float32)
  labels = np.array([1, 1, 0, 0], np.int32)
  loss, metrics = losses.disc_loss(logits, labels)
  _close(loss, np_bce(logits, labels).mean())
  _close(metrics["accuracy"], 0.5)  # right on 2.0 and -3.0, wrong on -1.0 and 0.5
  _close(metrics["d_real"], (np_sigmoid(2.0) + np_sigmoid(-1.0)) / 2)
  _close(metrics["d_fake"], (np_sigmoid(0.5) + np_sigmoid(-3.0)) / 2)
  assert int(metrics["n_real"]) == 2 and int(metrics["n_fake"]) == 2

  # sum(w * z) != 0, else a wrong smoothing offset would leave this weighted loss unchanged.
  weights = np.array([2.0, 0.0, 1.0, 1.0], np.float32)
  s = 0.1
  loss_w, metrics_w = losses.disc_loss(logits, labels, weights, label_smoothing=s)
  y_s = labels * (1 - s) + s / 2
  _close(loss_w, (weights * np_bce(logits, y_s)).sum() / weights.sum())
  _close(metrics_w["accuracy"], 3.0 / 4.0)  # weighted: (2 + 0 + 0 + 1) / 4
  _close(metrics_w["d_real"], np_sigmoid(2.0))  # the weight-0 real example is ignored
  assert int(metrics_w["n_real"]) == 1


def test_disc_loss_absent_class_and_extreme_logits():
  logits = np.array([100.0, -100.0, 30.0], np.float32)
  labels = np.zeros(3, np.float32)  # no real examples
  loss, metrics = losses.disc_loss(logits, labels)
  assert np.isfinite(float(loss))
  _close(loss, np_bce(logits, 0.0).mean(), rtol=1e-4)
  assert float(metrics["d_real"]) == 0.0 and int(metrics["n_real"]) == 0
  _close(metrics["d_fake"], (1.0 + 0.0 + np_sigmoid(30.0)) / 3)
  grad = jax.grad(lambda z: losses.disc_loss(z, labels)[0])(jnp.asarray(logits))
  assert np.all(np.isfinite(np.asarray(grad)))


def test_bradley_terry_loss():
  chosen = np.array([1.0, 0.0, 3.0, -2.0], np.float32)
  rejected = np.array([0.0, 0.0, -1.0, 2.0], np.float32)
  loss, metrics = rm_lib.bradley_terry_loss(chosen, rejected)
  diff = chosen - rejected
  _close(loss, -np.log(np_sigmoid(diff)).mean())
  _close(metrics["accuracy"], 0.5)  # ties do not count as correct
  _close(metrics["margin"], diff.mean())
  _close(rm_lib.bradley_terry_loss(np.zeros(3), np.zeros(3))[0], np.log(2.0))
  assert np.isfinite(float(rm_lib.bradley_terry_loss(np.array([-200.0]), np.array([200.0]))[0]))


def np_log_sigmoid(x):
  return -np.log1p(np.exp(-x))


def np_dpo(pc, pr, rc, rr, beta):
  """Pair by pair, in float64."""
  terms, hits = [], []
  for a, b, c, d in zip(pc, pr, rc, rr, strict=True):
    h = beta * ((a - c) - (b - d))
    terms.append(-np_log_sigmoid(h))
    hits.append(h > 0)
  return np.mean(terms), np.mean(hits)


def test_dpo_loss_matches_numpy(rng):
  pc, pr, rc, rr = (rng.normal(size=6) * 5 for _ in range(4))
  loss, m = dpo_lib.dpo_loss(pc, pr, rc, rr, 0.3)
  ref_loss, ref_acc = np_dpo(pc, pr, rc, rr, 0.3)
  _close(loss, ref_loss)
  _close(m["accuracy"], ref_acc)
  _close(m["chosen_reward"], np.mean(0.3 * (pc - rc)))
  # The policy equal to its reference: every implicit reward is 0, the loss log 2.
  _close(dpo_lib.dpo_loss(pc, pr, pc, pr, 0.3)[0], np.log(2.0))
  # Gradient: d loss / d policy_chosen = -beta sigmoid(-h) / B.
  g = jax.grad(lambda x: dpo_lib.dpo_loss(x, pr, rc, rr, 0.3)[0])(jnp.asarray(pc))
  h = 0.3 * ((pc - rc) - (pr - rr))
  _close(g, -0.3 * np_sigmoid(-h) / 6)


def np_kto(p, r, pk, rk, desirable, beta, wd, wu):
  z0 = max(0.0, float(np.mean(np.asarray(pk, np.float64) - np.asarray(rk, np.float64))))
  terms = []
  for a, b, d in zip(p, r, desirable, strict=True):
    reward = a - b
    if d:
      terms.append(wd * (1.0 - np_sigmoid(beta * (reward - z0))))
    else:
      terms.append(wu * (1.0 - np_sigmoid(beta * (z0 - reward))))
  return np.mean(terms), z0


@pytest.mark.parametrize("kl_shift", [0.0, 3.0])
def test_kto_loss_matches_numpy_with_its_kl_reference_point(rng, kl_shift):
  """kl_shift 0: the estimate is negative on average and clamps to 0; 3: z0 > 0 counts."""
  p, r = rng.normal(size=8) * 4, rng.normal(size=8) * 4
  rk = rng.normal(size=8)
  pk = rk + rng.normal(size=8) * 0.1 + kl_shift - 0.5
  desirable = np.array([1, 0, 1, 1, 0, 0, 1, 0], np.float32)
  loss, m = kto_lib.kto_loss(p, r, pk, rk, desirable, 0.2, 1.0, 1.5)
  ref_loss, z0 = np_kto(p, r, pk, rk, desirable, 0.2, 1.0, 1.5)
  assert (z0 > 0) == (kl_shift > 0)
  _close(loss, ref_loss)
  _close(m["kl"], z0)
  _close(m["desirable_reward"], np.mean((p - r)[desirable > 0]))
  _close(m["undesirable_reward"], np.mean((p - r)[desirable == 0]))
  # The reference point takes no gradient: the KL rows' log-probs get none.
  g = jax.grad(lambda x: kto_lib.kto_loss(p, r, x, rk, desirable, 0.2, 1.0, 1.5)[0])(
    jnp.asarray(pk)
  )
  _close(g, np.zeros(8))


def test_classifier_loss(rng):
  m, n = 4, 5
  logits = rng.normal(size=(B, m, n)).astype(np.float32)
  targets = rng.integers(0, n, size=(B, m))
  loss, metrics = classifier_lib.classifier_loss(logits, targets)
  logp = np_log_softmax(logits)
  ce = np.array([[-logp[b, h, targets[b, h]] for h in range(m)] for b in range(B)])
  _close(loss, ce.mean())
  per_head = [(logits[:, h].argmax(-1) == targets[:, h]).mean() for h in range(m)]
  _close(metrics["accuracy"], np.mean(per_head))


def test_sft_loss(rng):
  logits = rng.normal(size=(B, T, V)).astype(np.float32)
  targets = rng.integers(0, V, size=(B, T))
  targets[0, :3] = logits[0, :3].argmax(-1)  # some guaranteed hits
  mask = _ragged_mask()
  loss, metrics = losses.sft_loss(logits, targets, mask)
  logp = np_log_softmax(logits)
  nll = np.take_along_axis(-logp, targets[..., None], -1)[..., 0]
  _close(loss, np_masked_mean(nll, mask))
  _close(metrics["accuracy"], np_masked_mean(logits.argmax(-1) == targets, mask))
  assert float(metrics["accuracy"]) > 0.0
  _close(metrics["num_tokens"], mask.sum())
  # Padding ids at masked positions (e.g. -100) change nothing, in the value or the gradient.
  padded = np.where(mask > 0, targets, -100)
  _close(losses.sft_loss(logits, padded, mask)[0], loss)
  grad = jax.grad(lambda z: losses.sft_loss(z, padded, mask)[0])(jnp.asarray(logits))
  assert np.all(np.isfinite(np.asarray(grad))) and np.all(np.asarray(grad)[mask == 0] == 0.0)


# ----------------------------------------------------------------------------- jit


def test_everything_jits_and_matches_eager(rng):
  mask = _ragged_mask()
  bt = lambda: rng.normal(size=(B, T)).astype(np.float32)
  logits = rng.normal(size=(B, T, V)).astype(np.float32)
  targets = rng.integers(0, V, size=(B, T))
  z, y = rng.normal(size=(B,)).astype(np.float32), (rng.random(B) > 0.5).astype(np.float32)
  a, b_, c = bt(), bt(), bt()
  cases = [
    (losses.masked_mean, (a, mask), {}),
    (losses.masked_var, (a, mask), {}),
    (functools.partial(losses.masked_whiten, shift_mean=False), (a, mask), {}),
    (functools.partial(losses.gae, gamma=0.99, lam=0.95), (a, b_, mask), {}),
    (losses.gae, (a, b_, mask, jnp.float32(0.9), jnp.float32(0.8)), {}),  # traced gamma, lam
    (functools.partial(losses.kl_penalty, estimator="k3"), (a, b_), {}),
    (functools.partial(losses.token_rewards, estimator="k3"), (z, a, b_, mask, 0.05), {}),
    (losses.token_rewards, (z, a, b_, mask, jnp.float32(0.05)), {}),
    (functools.partial(losses.ppo_policy_loss, clip_eps=0.2, dual_clip=3.0), (a, b_, c, mask), {}),
    (losses.ppo_policy_loss, (a, b_, c, mask, 0.2, jnp.float32(3.0)), {}),  # traced dual clip
    (functools.partial(losses.value_loss, value_clip=0.2), (a, b_, c, mask), {}),
    (losses.entropy_from_logits, (logits, mask), {}),
    (losses.explained_variance, (a, b_, mask), {}),
    (losses.disc_loss, (z, y, y + 0.5), {}),
    (functools.partial(losses.disc_loss, label_smoothing=0.1), (z, y), {}),
    (rm_lib.bradley_terry_loss, (z, y), {}),
    (classifier_lib.classifier_loss, (logits, targets), {}),  # M = T heads, N = V bins
    (losses.sft_loss, (logits, targets, mask), {}),
    (functools.partial(losses.reward_from_disc, transform="log"), (z,), {}),
    (functools.partial(losses.normalize_rewards, mode="whiten"), (z,), {}),
    (losses.update_kl_coef, (0.1, jnp.float32(7.0), 6.0, 10000.0, 32), {}),
  ]
  for fn, args, kwargs in cases:
    eager = fn(*args, **kwargs)
    jitted = jax.jit(fn)(*args, **kwargs)
    for e, j in zip(jax.tree.leaves(eager), jax.tree.leaves(jitted), strict=True):
      _close(j, e, rtol=1e-5, atol=1e-5)


def test_group_normalize_rewards_matches_numpy():
  rng = np.random.default_rng(3)
  r = rng.normal(size=12).astype(np.float32) * 3 + 1
  out = np.asarray(losses.normalize_rewards(jnp.asarray(r), "group", 4))
  for g in range(3):
    x = r[4 * g : 4 * g + 4].astype(np.float64)
    ref = (x - x.mean()) / np.sqrt(x.var() + losses.EPS)
    np.testing.assert_allclose(out[4 * g : 4 * g + 4], ref, rtol=1e-5, atol=1e-6)
  # A constant offset per prompt (an easy vs. a hard query) does not change the result.
  shifted = r + np.repeat(np.array([5.0, -2.0, 0.0], np.float32), 4)
  np.testing.assert_allclose(
    losses.normalize_rewards(jnp.asarray(shifted), "group", 4), out, atol=1e-5
  )
