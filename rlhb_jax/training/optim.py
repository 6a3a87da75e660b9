"""Optimizers: AdamW with warm-up and clipping, and skipping non-finite updates."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from rlhb_jax.training.config import OptimConfig

# apply_if_finite gives up skipping after this many non-finite updates in a row; the training loop
# stops long before (config.rlhb.max_nonfinite_in_row), so it never does.
_NEVER = 2**30


def make_optimizer(cfg: OptimConfig, total_steps: int) -> optax.GradientTransformation:
  """AdamW after global-norm clipping, its learning rate held at 0 for `delay_steps` updates, then
  warmed up linearly from 0; an update whose gradients are not finite leaves parameters and
  optimizer state as they were."""
  warmup = max(1, min(cfg.warmup_steps, total_steps))
  schedule = optax.warmup_constant_schedule(0.0, cfg.learning_rate, warmup)
  if cfg.delay_steps > 0:  # update `delay_steps` is the warm-up's first with a learning rate > 0
    warm = schedule
    schedule = optax.join_schedules(
      [optax.constant_schedule(0.0), lambda step: warm(step + 1)], [cfg.delay_steps]
    )
  return optax.apply_if_finite(
    optax.chain(
      optax.clip_by_global_norm(cfg.max_grad_norm),
      optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay),
    ),
    max_consecutive_errors=_NEVER,
  )


def all_finite(*trees) -> jax.Array:
  """True when every leaf of every tree is finite."""
  leaves = [jnp.all(jnp.isfinite(x)) for t in trees for x in jax.tree.leaves(t)]
  return jnp.all(jnp.stack(leaves))
