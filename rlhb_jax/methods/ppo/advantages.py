"""Advantages for PPO: GAE over a learned critic, or critic-free group baselines (RLOO / GRPO).

Both take the sequence rewards (B,), the sampled tokens' log-probs under the actor and the
reference (B, Tn), the critic's values (None without one) and the completion mask, with the B rows
ordered as Bp prompts x n rollouts. Each estimator is registered under its `config.ppo.advantage`
name with whether it learns a critic; a new estimator is one decorated function here.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING, NamedTuple

import jax
import jax.numpy as jnp

from rlhb_jax.infra.registry import Registry
from rlhb_jax.training import losses

if TYPE_CHECKING:
  from rlhb_jax.methods.ppo.config import PPOConfig


class Advantages(NamedTuple):
  advantages: jax.Array  # (B, Tn), 0 at masked positions
  returns: jax.Array  # (B, Tn) value targets (0 without a critic)
  kl: jax.Array  # (B, Tn) per-token KL(actor || reference) estimate
  return_per_seq: jax.Array  # (B,) the shaped return each rollout was credited with


@dataclasses.dataclass(frozen=True)
class Estimator:
  fn: Callable  # (seq_reward, logprobs, ref_logprobs, values, mask, kl_coef, ppo) -> Advantages
  critic: bool  # learns a critic (built from the generator, trained with the value loss)


ESTIMATORS = Registry("config.ppo.advantage", Estimator)
register = ESTIMATORS.register
get = ESTIMATORS.get


def group_baseline(rewards: jax.Array, n: int, scale: bool) -> jax.Array:
  """Leave-one-out advantages within each prompt's n rollouts (rows grouped consecutively).

    A_ij = r_ij - (sum_k r_ik - r_ij) / (n - 1)          (RLOO)
    A_ij <- A_ij / (std_k r_ik + eps)                    (with `scale`, as in GRPO)

  The baseline excludes the rollout itself, so A is an unbiased advantage estimate; n = 1 has no
  baseline and gives A = r. `n` and `scale` are static.
  """
  r = rewards.astype(jnp.float32).reshape(-1, n)
  adv = r - (r.sum(axis=1, keepdims=True) - r) / (n - 1) if n > 1 else r
  if scale:
    adv = adv / (r.std(axis=1, keepdims=True) + 1e-6)
  return jax.lax.stop_gradient(adv.reshape(rewards.shape))


@register("gae", critic=True)
def gae_advantages(seq_reward, logprobs, ref_logprobs, values, mask, kl_coef, ppo: PPOConfig):
  """Token rewards (the sequence reward at the last token minus beta KL per token), GAE(gamma,
  lambda) over the critic's values, advantages whitened over the batch."""
  rewards, kl = losses.token_rewards(
    seq_reward, logprobs, ref_logprobs, mask, kl_coef, ppo.kl_estimator
  )
  adv, returns = losses.gae(rewards, values * mask, mask, ppo.gamma, ppo.lam)
  return Advantages(losses.masked_whiten(adv, mask), returns, kl, jnp.sum(rewards * mask, axis=1))


@register("group", critic=False)
def group_advantages(seq_reward, logprobs, ref_logprobs, values, mask, kl_coef, ppo: PPOConfig):
  """Critic-free: the rollout's return r - beta * sum_t KL_t against the mean return of the other
  rollouts of its prompt (`group_baseline`), the same advantage on every token of the response.
  `values` is unused (there is no critic)."""
  del values
  kl = losses.kl_penalty(
    jax.lax.stop_gradient(logprobs), jax.lax.stop_gradient(ref_logprobs), ppo.kl_estimator
  )
  kl = jnp.where(mask != 0, kl, 0.0)
  ret = jax.lax.stop_gradient(seq_reward.astype(jnp.float32)) - kl_coef * jnp.sum(kl, axis=1)
  adv = group_baseline(ret, ppo.rollouts_per_prompt, ppo.advantage_std)
  return Advantages(adv[:, None] * mask, jnp.zeros_like(kl), kl, ret)
