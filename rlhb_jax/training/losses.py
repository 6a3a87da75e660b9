"""Every loss of the framework as a pure function of arrays (PPO policy and value, KL estimators,
GAE, the discriminator's GAN loss, token cross-entropy, ...), each with its equation in its
docstring and a NumPy reference in tests/test_losses.py."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

Array = jax.Array

Metrics = dict[str, Array]

EPS = 1e-8


KL_ESTIMATORS = ("k1", "k2", "k3")


REWARD_TRANSFORMS = ("prob", "log", "logit")


REWARD_NORMALIZATIONS = ("none", "center", "whiten", "group")


def to_f32(x: Array) -> Array:
  """Promotes to at least float32 (bf16 -> f32, f64 stays f64)."""
  x = jnp.asarray(x)
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def masked_mean(
  x: Array, mask: Array, axis: int | tuple[int, ...] | None = None, keepdims: bool = False
) -> Array:
  """sum(x * m) / (sum(m) + EPS) over `axis`; NaNs at masked positions do not leak."""
  x, m = to_f32(x), to_f32(mask)
  # where (not x * m) so a NaN or inf at a masked position contributes 0.
  num = jnp.sum(jnp.where(m != 0, x * m, 0.0), axis=axis, keepdims=keepdims)
  return num / (jnp.sum(m, axis=axis, keepdims=keepdims) + EPS)


def masked_var(
  x: Array, mask: Array, axis: int | tuple[int, ...] | None = None, unbiased: bool = False
) -> Array:
  """Masked variance: mean_m((x - mean_m(x))^2), times n / (n - 1) when `unbiased`."""
  mean = masked_mean(x, mask, axis=axis, keepdims=True)
  var = masked_mean(jnp.square(to_f32(x) - mean), mask, axis=axis)
  if unbiased:
    n = jnp.sum(to_f32(mask), axis=axis)
    var = var * n / jnp.maximum(n - 1.0, 1.0)
  return var


def masked_whiten(x: Array, mask: Array, shift_mean: bool = True) -> Array:
  """(x - mean) / sqrt(var + EPS) over all unmasked entries; masked positions become 0.

  With `shift_mean=False` the mean is added back (only the scale is normalised), as is usual for
  advantages in PPO implementations that keep their sign.
  """
  x = to_f32(x)
  mean = masked_mean(x, mask)
  var = masked_var(x, mask)
  out = (x - mean) * jax.lax.rsqrt(var + EPS)
  if not shift_mean:
    out = out + mean
  return jnp.where(to_f32(mask) != 0, out, 0.0)


def gae(
  rewards: Array, values: Array, mask: Array, gamma: float | Array, lam: float | Array
) -> tuple[Array, Array]:
  """Generalised advantage estimation over a (B, T) response.

    delta_t = r_t + gamma * V_{t+1} - V_t
    A_t     = delta_t + gamma * lam * A_{t+1}
    R_t     = A_t + V_t

  V and A beyond the last valid token are 0 (the episode ends with the response: bootstrap value 0).
  Masked positions are skipped, not zeroed, in the recursion: t+1 means the next *unmasked*
  position, so a right-padded mask and a mask with holes both work. Masked positions get A = R = 0.

  Returns:
    (advantages, returns), both (B, T) float32, gradient-free (stop_gradient on the inputs).
  """
  rewards, values = (
    jax.lax.stop_gradient(to_f32(rewards)),
    jax.lax.stop_gradient(to_f32(values)),
  )
  valid = to_f32(mask) != 0
  rewards = jnp.where(valid, rewards, 0.0)
  values = jnp.where(valid, values, 0.0)

  def step(carry, xs):
    next_adv, next_value = carry
    r, v, m = xs
    adv = r + gamma * next_value - v + gamma * lam * next_adv
    # A masked position passes the carry through unchanged.
    carry = (jnp.where(m, adv, next_adv), jnp.where(m, v, next_value))
    return carry, jnp.where(m, adv, 0.0)

  zeros = jnp.zeros(rewards.shape[:1], rewards.dtype)
  _, adv_tb = jax.lax.scan(step, (zeros, zeros), (rewards.T, values.T, valid.T), reverse=True)
  advantages = adv_tb.T
  return advantages, jnp.where(valid, advantages + values, 0.0)


def kl_penalty(logprobs: Array, ref_logprobs: Array, estimator: str = "k1") -> Array:
  """Per-token estimate of KL(pi || pi_ref) from samples of pi (Schulman's estimators).

    k1 = log pi - log pi_ref                    (unbiased, can be negative)
    k2 = 0.5 * (log pi - log pi_ref)^2          (biased, >= 0)
    k3 = (rho - 1) - log rho,  rho = pi_ref / pi (unbiased, >= 0)

  `estimator` is static. No clamping: exp overflows only for |log ratio| > 88.
  """
  d = to_f32(logprobs) - to_f32(ref_logprobs)
  if estimator == "k1":
    return d
  if estimator == "k2":
    return 0.5 * jnp.square(d)
  if estimator == "k3":
    # rho - 1 - log rho with log rho = -d; expm1 keeps precision near rho = 1.
    return jnp.expm1(-d) + d
  raise ValueError(f"unknown KL estimator {estimator!r}; expected one of {KL_ESTIMATORS}")


def token_rewards(
  seq_reward: Array,
  logprobs: Array,
  ref_logprobs: Array,
  mask: Array,
  kl_coef: float | Array,
  estimator: str = "k1",
) -> tuple[Array, Array]:
  """Per-token rewards: the sequence reward at the last valid token minus a KL penalty per token.

    r_t = seq_reward * [t == last valid t] - kl_coef * KL_t,   KL_t = kl_penalty(estimator)

  Args:
    seq_reward: (B,) sequence rewards, e.g. `reward_from_disc` of the discriminator logits.
    logprobs, ref_logprobs: (B, T) sampled-token log-probabilities under actor and reference.
    mask: (B, T) completion mask; a fully masked row receives no reward.
    kl_coef: beta, a float or a traced scalar (adaptive controller).
    estimator: static, see `kl_penalty`.

  Returns:
    (rewards, kl), both (B, T) float32 and 0 at masked positions; both gradient-free.
  """
  valid = to_f32(mask) != 0
  kl = kl_penalty(jax.lax.stop_gradient(logprobs), jax.lax.stop_gradient(ref_logprobs), estimator)
  kl = jnp.where(valid, kl, 0.0)
  positions = jnp.arange(valid.shape[1])
  last = jnp.max(jnp.where(valid, positions, -1), axis=1)  # -1 for an empty row
  at_last = positions[None, :] == last[:, None]
  seq_reward = jax.lax.stop_gradient(to_f32(seq_reward))
  # 0 at masked positions: kl is, and `at_last` only marks valid ones.
  rewards = jnp.where(at_last, seq_reward[:, None], 0.0) - kl_coef * kl
  return rewards, kl


def update_kl_coef(
  kl_coef: float | Array,
  observed_kl: float | Array,
  target: float | Array,
  horizon: float | Array,
  batch_size: int | Array,
) -> Array:
  """Adaptive KL coefficient, the proportional controller of Ziegler et al. (2019).

    e     = clip(KL_observed / KL_target - 1, -0.2, 0.2)
    beta <- beta * (1 + e * n / horizon)

  `observed_kl` is the mean per-sequence KL of the batch, `batch_size` n the number of sequences.
  """
  error = jnp.clip(to_f32(observed_kl) / target - 1.0, -0.2, 0.2)
  return to_f32(kl_coef) * (1.0 + error * batch_size / horizon)


def reward_from_disc(disc_logits: Array, transform: str = "prob") -> Array:
  """Sequence reward f(D) from discriminator logits z, D = sigmoid(z); `transform` is static.

  'prob':  f = sigmoid(z)        in (0, 1); 0.5 at the GAN equilibrium
  'log':   f = log sigmoid(z)    in (-inf, 0)
  'logit': f = z                 = log D - log(1 - D)
  """
  z = jax.lax.stop_gradient(to_f32(disc_logits))
  if transform == "prob":
    return jax.nn.sigmoid(z)
  if transform == "log":
    return jax.nn.log_sigmoid(z)
  if transform == "logit":
    return z
  raise ValueError(f"unknown reward transform {transform!r}; expected one of {REWARD_TRANSFORMS}")


def normalize_rewards(rewards: Array, mode: str = "none", group_size: int = 1) -> Array:
  """Normalises (B,) sequence rewards; `mode` and `group_size` are static.

  'none': r;   'center': r - mean(r);   'whiten': (r - mean(r)) / sqrt(var(r) + EPS) over the batch;
  'group': the same whitening within each group of `group_size` consecutive rows (the n rollouts
  of one prompt), so that only how a response compares with its siblings counts, not how hard its
  query is:  r_ij -> (r_ij - mean_j r_ij) / sqrt(var_j r_ij + EPS).
  """
  r = to_f32(rewards)
  if mode == "none":
    return r
  if mode == "center":
    return r - jnp.mean(r)
  if mode == "whiten":
    return (r - jnp.mean(r)) * jax.lax.rsqrt(jnp.var(r) + EPS)
  if mode == "group":
    g = r.reshape(-1, group_size)
    g = (g - g.mean(axis=1, keepdims=True)) * jax.lax.rsqrt(g.var(axis=1, keepdims=True) + EPS)
    return g.reshape(r.shape)
  raise ValueError(
    f"unknown reward normalization {mode!r}; expected one of {REWARD_NORMALIZATIONS}"
  )


def ppo_policy_loss(
  logprobs: Array,
  old_logprobs: Array,
  advantages: Array,
  mask: Array,
  clip_eps: float | Array,
  dual_clip: float | Array = 0.0,
) -> tuple[Array, Metrics]:
  """PPO clipped surrogate, optionally dual-clipped (Ye et al. 2020), as a masked token mean.

    rho_t = exp(log pi_t - log pi_old_t)
    l_t   = max(-A_t * rho_t, -A_t * clip(rho_t, 1 - eps, 1 + eps))
    l_t   = min(l_t, -c * A_t)          where A_t < 0, only when c = dual_clip > 0 (c > 1)
    loss  = sum_t m_t l_t / (sum_t m_t + EPS)

  Metrics (masked means, gradient-free): clip_frac (tokens where the clipped term is active),
  dual_clip_frac (tokens where the dual bound is active), approx_kl (k3 estimate of
  KL(pi_old || pi), (rho - 1) - log rho), ratio (mean rho).
  """
  if isinstance(dual_clip, int | float) and 0 < dual_clip <= 1:
    raise ValueError(f"dual_clip must be 0 (off) or > 1, got {dual_clip}")
  log_ratio = to_f32(logprobs) - jax.lax.stop_gradient(to_f32(old_logprobs))
  ratio = jnp.exp(log_ratio)
  adv = jax.lax.stop_gradient(to_f32(advantages))
  unclipped = -adv * ratio
  clipped = -adv * jnp.clip(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
  per_token = jnp.maximum(unclipped, clipped)
  # jnp.where, not `if`, so dual_clip may also be traced.
  dual_active = (dual_clip > 0) & (adv < 0) & (per_token > -dual_clip * adv)
  per_token = jnp.where(dual_active, -dual_clip * adv, per_token)
  loss = masked_mean(per_token, mask)

  log_ratio, ratio = jax.lax.stop_gradient(log_ratio), jax.lax.stop_gradient(ratio)
  metrics = {
    "clip_frac": masked_mean(jax.lax.stop_gradient(clipped > unclipped), mask),
    "dual_clip_frac": masked_mean(jax.lax.stop_gradient(dual_active), mask),
    "approx_kl": masked_mean(jnp.expm1(log_ratio) - log_ratio, mask),
    "ratio": masked_mean(ratio, mask),
  }
  return loss, metrics


def value_loss(
  values: Array, old_values: Array, returns: Array, mask: Array, value_clip: float | Array
) -> tuple[Array, Metrics]:
  """Clipped value loss (PPO2 style) as a masked token mean.

    v_clip = V_old + clip(V - V_old, -eps, eps)
    loss   = 0.5 * sum_t m_t max((V - R)^2, (v_clip - R)^2) / (sum_t m_t + EPS)

  `value_clip` = eps <= 0 turns clipping off (plain 0.5 * MSE). Metrics: clip_frac (tokens where the
  clipped term is the larger one), mean value and mean return.
  """
  v = to_f32(values)
  old = jax.lax.stop_gradient(to_f32(old_values))
  ret = jax.lax.stop_gradient(to_f32(returns))
  v_clipped = old + jnp.clip(v - old, -value_clip, value_clip)
  err = jnp.square(v - ret)
  err_clipped = jnp.square(v_clipped - ret)
  use_clip = (value_clip > 0) & (err_clipped > err)
  per_token = jnp.where(use_clip, err_clipped, err)
  loss = 0.5 * masked_mean(per_token, mask)
  metrics = {
    "clip_frac": masked_mean(use_clip, mask),
    "value_mean": masked_mean(jax.lax.stop_gradient(v), mask),
    "return_mean": masked_mean(ret, mask),
  }
  return loss, metrics


def entropy_from_logits(logits: Array, mask: Array) -> Array:
  """Masked mean token entropy, H_t = -sum_v p_tv log p_tv, p = softmax(logits) over V, in f32.

  Logits (B, T, V); -inf logits (banned tokens) contribute 0 to the value and the gradient.
  """
  logp = jax.nn.log_softmax(to_f32(logits), axis=-1)
  p = jnp.exp(logp)
  # Double where: p * log p is 0 * -inf = NaN for banned tokens, in the value and in the gradient.
  safe_logp = jnp.where(p > 0, logp, 0.0)
  entropy = -jnp.sum(p * safe_logp, axis=-1)
  return masked_mean(entropy, mask)


def explained_variance(values: Array, returns: Array, mask: Array) -> Array:
  """1 - Var_m(R - V) / (Var_m(R) + EPS): 1 is a perfect critic, 0 predicts the mean, < 0 worse."""
  v, r = to_f32(values), to_f32(returns)
  return 1.0 - masked_var(r - v, mask) / (masked_var(r, mask) + EPS)


def disc_loss(
  logits: Array,
  labels: Array,
  weights: Array | None = None,
  label_smoothing: float = 0.0,
) -> tuple[Array, Metrics]:
  """Discriminator binary cross-entropy with logits, optionally weighted per example.

    y~   = y * (1 - s) + s / 2                   (label smoothing s)
    l_i  = -y~ log sigmoid(z_i) - (1 - y~) log sigmoid(-z_i)
    loss = sum_i w_i l_i / (sum_i w_i + EPS)     (w = 1 when `weights` is None)

  Metrics, weighted like the loss and computed on the unsmoothed labels: accuracy (sign of z vs y),
  d_real (mean sigmoid(z) over y = 1), d_fake (mean sigmoid(z) over y = 0), n_real, n_fake. A class
  absent from the batch gives d_real or d_fake = 0 (check n_real / n_fake), never NaN.
  """
  z = to_f32(logits)
  y = to_f32(labels)
  w = jnp.ones_like(z) if weights is None else to_f32(weights)
  targets = y * (1.0 - label_smoothing) + 0.5 * label_smoothing
  per_example = optax.sigmoid_binary_cross_entropy(z, targets)
  loss = masked_mean(per_example, w)

  z, y = jax.lax.stop_gradient(z), jax.lax.stop_gradient(y)
  is_real = y > 0.5
  prob = jax.nn.sigmoid(z)
  correct = (z > 0) == is_real
  metrics = {
    "accuracy": masked_mean(correct, w),
    "d_real": masked_mean(prob, w * is_real),
    "d_fake": masked_mean(prob, w * ~is_real),
    # float32 like every other metric, so that metric trees average and log uniformly.
    "n_real": jnp.sum(is_real & (w != 0), dtype=jnp.float32),
    "n_fake": jnp.sum(~is_real & (w != 0), dtype=jnp.float32),
  }
  return loss, metrics


def sft_loss(logits: Array, targets: Array, mask: Array) -> tuple[Array, Metrics]:
  """Masked next-token cross-entropy in f32 (logits already aligned with their targets).

    loss = -sum_t m_t log softmax(logits_t)[y_t] / (sum_t m_t + EPS),   logits (B, T, V), y (B, T)

  Metrics: accuracy (masked mean of argmax == y), num_tokens (sum of the mask).
  """
  logits = to_f32(logits)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
  loss = masked_mean(ce, mask)
  correct = jnp.argmax(jax.lax.stop_gradient(logits), axis=-1) == targets
  return loss, {"accuracy": masked_mean(correct, mask), "num_tokens": jnp.sum(to_f32(mask))}
