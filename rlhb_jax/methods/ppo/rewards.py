"""Sequence rewards of rollouts: the discriminator (RLHB), a reward model (RLHF), the behavior
classifier (RLHBC), their sum, or the simulated users' ground truth (the ceiling).

Each source is a function of (roles, state, batch, rollout, cfg) inside the one jitted step,
registered under its `config.reward.source` name with what the rest of the framework needs to
know about it (`RewardSource`). This registry is the one place that reads that name; a new reward
is one decorated function here.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from rlhb_jax.config import Config
from rlhb_jax.infra.registry import Registry
from rlhb_jax.methods import classifier as classifier_lib
from rlhb_jax.methods import reward_model as rm_lib
from rlhb_jax.methods.disc import score
from rlhb_jax.model import lora
from rlhb_jax.training import losses
from rlhb_jax.training.forward import concat


@dataclasses.dataclass(frozen=True)
class RewardSource:
  fn: Callable  # (roles, state, batch, rollout, cfg) -> (reward (B,), metrics)
  uses_disc: bool = False  # D scores the rollouts, so the PPO stage trains D as well
  # Loads the frozen scorer it reads (RLHF's reward model, RLHBC's classifier):
  # (run, cfg, generator) -> (model, extras for the step's roles); None reads none.
  frozen: Callable | None = None
  batch_fields: tuple[str, ...] = ()  # what RLHB batches carry for it beyond the prompts
  show: tuple[str, ...] = ()  # the progress bar's metrics besides reward_mean, kl, tokens_per_s
  single_process: bool = False  # a host callback: one process only
  simulator_only: bool = False  # needs the simulator's own logs and is an offline ceiling
  # The reward is D's score of the rollouts alone (without ppo.reward_contrast), which D's update
  # computes anyway: `step.fused_disc_scoring` reads it off that update's forward.
  disc_score_only: bool = False


SOURCES = Registry("config.reward.source", RewardSource)
register = SOURCES.register
get = SOURCES.get


def uses_disc(cfg: Config) -> bool:
  return get(cfg.reward.source).uses_disc


def disc_score_only(cfg: Config) -> bool:
  """Whether the reward is D's score of the rollouts alone (no contrast prefix, nothing beside)."""
  return get(cfg.reward.source).disc_score_only and not cfg.ppo.reward_contrast


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


@register("disc", uses_disc=True, show=("d_real", "d_fake"), disc_score_only=True)
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
  contrast = logits[B:] if cfg.ppo.reward_contrast else None
  return reward_from_scores(logits[:B], contrast, cfg)


def reward_from_scores(d_logits, contrast_logits, cfg: Config):
  """The RLHB reward f(D) (or f(D - D(least preferred))) from D's logits on the rollouts."""
  reward_logits = d_logits if contrast_logits is None else d_logits - contrast_logits
  reward = losses.reward_from_disc(reward_logits, cfg.ppo.reward_transform)
  return reward, {"d_fake_rollout": jnp.nanmean(jax.nn.sigmoid(d_logits))}


def _frozen_scores(roles, state, batch: dict, ro, cfg: Config) -> jax.Array:
  """The frozen reward model's or classifier's last-token outputs on (q, r), (B, M)."""
  n = cfg.ppo.rollouts_per_prompt
  prefix = jnp.repeat(batch["rm_prefix"], n, axis=0)
  mask = jnp.repeat(batch["rm_prefix_mask"], n, axis=0)
  tokens, tmask = concat(prefix, mask, ro.tokens, ro.mask)
  return nnx.merge(roles.rm, state.rm).last_token(tokens, tmask)


@register(
  "rm", frozen=rm_lib.frozen_reward_model, batch_fields=("rm_prefix",), show=("rm_reward_mean",)
)
def rm_reward(roles, state, batch: dict, ro, cfg: Config):
  """RLHF: the frozen Bradley-Terry reward model's score of (q, r)."""
  r = _frozen_scores(roles, state, batch, ro, cfg)[:, 0]
  return r, {"rm_reward_mean": jnp.nanmean(r)}


@register(
  "classifier",
  frozen=classifier_lib.frozen_classifier,
  batch_fields=("rm_prefix",),
  show=("rm_reward_mean",),
)
def behavior_classifier_reward(roles, state, batch: dict, ro, cfg: Config):
  """RLHBC: the classifier's expected behavior counts of (q, r), combined by the formula."""
  k, nb = roles.bin_counts.shape
  out = _frozen_scores(roles, state, batch, ro, cfg)
  r = classifier_reward(
    out.reshape(-1, k, nb), roles.bin_counts, roles.reward_num, roles.reward_den
  )
  return r, {"rm_reward_mean": jnp.nanmean(r)}


@register(
  "disc+rm",
  uses_disc=True,
  frozen=rm_lib.frozen_reward_model,
  batch_fields=("rm_prefix",),
  show=("d_real", "d_fake"),
)
def disc_plus_rm_reward(roles, state, batch: dict, ro, cfg: Config):
  """f(D) + reward.rm_weight * RM: RLHB continued with RLHF's reward model beside it."""
  d, dm = disc_reward(roles, state, batch, ro, cfg)
  r, rm = rm_reward(roles, state, batch, ro, cfg)
  return d + cfg.reward.rm_weight * r, dm | rm


@register("sim", batch_fields=("query_index",), single_process=True, simulator_only=True)
def sim_reward(roles, state, batch: dict, ro, cfg: Config):
  """The simulated users' expected like rate of each rollout, through a host callback."""
  del state
  index = jnp.repeat(batch["query_index"], cfg.ppo.rollouts_per_prompt, axis=0)
  out = jax.ShapeDtypeStruct(index.shape, jnp.float32)
  reward = jax.pure_callback(roles.oracle, out, ro.tokens, ro.mask, index)
  return reward, {"sim_reward_mean": jnp.mean(reward)}


def sequence_reward(roles, state, batch: dict, ro, cfg: Config):
  """Per-rollout reward (B,) from `cfg.reward.source`, and its metrics."""
  return get(cfg.reward.source).fn(roles, state, batch, ro, cfg)
