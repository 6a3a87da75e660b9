"""Sequence rewards of rollouts: the discriminator (RLHB), a reward model (RLHF), the behavior
classifier (RLHBC), their sum, or the simulated users' ground truth (the ceiling).

Each is a function of (roles, state, batch, rollout) inside the one jitted step; `sequence_reward`
picks one by `cfg.reward.source` at trace time.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from rlhb_jax import losses
from rlhb_jax.config import Config
from rlhb_jax.model import lora


def concat(a, a_mask, b, b_mask):
  return jnp.concatenate([a, b], axis=1), jnp.concatenate([a_mask, b_mask], axis=1)


def score(disc_def, disc: Any, prefix, prefix_mask, response, response_mask) -> jax.Array:
  """Discriminator logits (B,) of "query / behavior / response" triplets (prefix then response).
  `disc` is the full params tree (trainable and frozen halves joined)."""
  tokens, mask = concat(prefix, prefix_mask, response, response_mask)
  return nnx.merge(disc_def, disc).last_token(tokens, mask)[:, 0]


def uses_disc(cfg: Config) -> bool:
  return cfg.reward.source in ("disc", "disc+rm")


def classifier_reward(logits: jax.Array, bin_counts, num, den) -> jax.Array:
  """RLHBC reward from per-behavior bin logits (B, K, N).

  E[count_k] = sum_b softmax(logits)_kb * bin_counts_kb (per impression), and
  reward = sum_k num_k E[count_k] / max(sum_k den_k E[count_k], 1e-6).
  """
  p = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
  expected = jnp.sum(p * jnp.asarray(bin_counts, jnp.float32), axis=-1)  # (B, K)
  top = expected @ jnp.asarray(num, jnp.float32)
  bottom = expected @ jnp.asarray(den, jnp.float32)
  return top / jnp.maximum(bottom, 1e-6)


def disc_reward(roles, state, batch: dict, ro, cfg: Config):
  """f(D(q, r, target)), or with `ppo.reward_contrast` f(D(target) - D(least preferred)); the two
  prefixes are scored in one batched pass over the rollouts."""
  n = cfg.ppo.rollouts_per_prompt
  disc = lora.join(state.disc, state.frozen["disc"])
  prefix, prefix_mask, tokens, mask = ro.prefix, ro.prefix_mask, ro.tokens, ro.mask
  if cfg.ppo.reward_contrast:
    rep = lambda x: jnp.repeat(x, n, axis=0)
    both = lambda a, b: jnp.concatenate([a, b], axis=0)
    prefix = both(prefix, rep(batch["contrast_prefix"]))
    prefix_mask = both(prefix_mask, rep(batch["contrast_prefix_mask"]))
    tokens, mask = both(tokens, tokens), both(mask, mask)
  logits = score(roles.disc, disc, prefix, prefix_mask, tokens, mask)
  B = ro.tokens.shape[0]
  d_logits = logits[:B]
  reward_logits = d_logits - logits[B:] if cfg.ppo.reward_contrast else d_logits
  reward = losses.reward_from_disc(reward_logits, cfg.ppo.reward_transform)
  return reward, {"d_fake_rollout": jnp.nanmean(jax.nn.sigmoid(d_logits))}


def model_reward(roles, state, batch: dict, ro, cfg: Config):
  """The frozen reward model's score (RLHF) or the classifier's formula (RLHBC) of (q, r)."""
  n = cfg.ppo.rollouts_per_prompt
  prefix = jnp.repeat(batch["rm_prefix"], n, axis=0)
  mask = jnp.repeat(batch["rm_prefix_mask"], n, axis=0)
  tokens, tmask = concat(prefix, mask, ro.tokens, ro.mask)
  out = nnx.merge(roles.rm, state.rm).last_token(tokens, tmask)
  if cfg.reward.source == "classifier":
    k, nb = roles.bin_counts.shape
    r = classifier_reward(
      out.reshape(-1, k, nb), roles.bin_counts, roles.reward_num, roles.reward_den
    )
  else:
    r = out[:, 0]
  return r, {"rm_reward_mean": jnp.nanmean(r)}


def sim_reward(roles, state, batch: dict, ro, cfg: Config):
  """The simulated users' expected like rate of each rollout, through a host callback."""
  del state
  index = jnp.repeat(batch["query_index"], cfg.ppo.rollouts_per_prompt, axis=0)
  out = jax.ShapeDtypeStruct(index.shape, jnp.float32)
  reward = jax.pure_callback(roles.oracle, out, ro.tokens, ro.mask, index)
  return reward, {"sim_reward_mean": jnp.mean(reward)}


def sequence_reward(roles, state, batch: dict, ro, cfg: Config):
  """Per-rollout reward (B,) from `cfg.reward.source`, and its metrics."""
  match cfg.reward.source:
    case "sim":
      return sim_reward(roles, state, batch, ro, cfg)
    case "disc":
      return disc_reward(roles, state, batch, ro, cfg)
    case "rm" | "classifier":
      return model_reward(roles, state, batch, ro, cfg)
    case "disc+rm":
      d, dm = disc_reward(roles, state, batch, ro, cfg)
      r, rm = model_reward(roles, state, batch, ro, cfg)
      return d + cfg.reward.rm_weight * r, dm | rm
  raise ValueError(f"config.reward.source={cfg.reward.source!r}")
