"""The behavior-conditioned discriminator: scoring (query, response, behavior) triplets, its
batches of real, generated and behavior-swapped rows, its update, and its warm-up stage.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from rlhb_jax.config import Config
from rlhb_jax.model import build as build_lib
from rlhb_jax.model import lora
from rlhb_jax.run import Run
from rlhb_jax.training import losses, optim
from rlhb_jax.training.forward import concat
from rlhb_jax.training.optim import all_finite
from rlhb_jax.training.trainable import SupervisedState, jit_step, train_model

if TYPE_CHECKING:
  from rlhb_jax.methods.ppo.step import Rollout


def score(disc_def, disc: Any, prefix, prefix_mask, response, response_mask) -> jax.Array:
  """Discriminator logits (B,) of "query / behavior / response" triplets (prefix then response).
  `disc` is the full params tree (trainable and frozen halves joined)."""
  tokens, mask = concat(prefix, prefix_mask, response, response_mask)
  return nnx.merge(disc_def, disc).last_token(tokens, mask)[:, 0]


class DiscBatch(NamedTuple):
  tokens: jax.Array  # (R, Pd + Tn)
  mask: jax.Array
  labels: jax.Array  # (R,) 1 real, 0 fake
  weights: jax.Array  # (R,)
  kind: jax.Array  # (R,) 0 real, 1 generated, 2 behavior-swapped


def bootstrap_weights(w: jax.Array, seq_reward: jax.Array, ratio: float) -> jax.Array:
  """The generated rows' weights `w` with the top `ratio` share of them by reward counting twice."""
  if ratio <= 0:
    return w
  k = max(1, int(round(ratio * w.shape[0])))
  top = jax.lax.top_k(seq_reward, k)[1]
  return w.at[top].multiply(2.0)


def disc_batch(batch: dict, ro: Rollout | None, seq_reward, cfg: Config) -> DiscBatch:
  """Real triplets vs. generated, behavior-swapped and bootstrapped (top-rho generated) fakes.

  Real rows weigh 1 each; the fakes share the same total weight, `swap_fraction` of it on swapped
  rows. The top `bootstrap_ratio` share of generated rows by reward counts twice (`seq_reward`
  None leaves that to `disc_update`'s `scored`). Generated rows come last.
  """
  d = cfg.disc
  real_t, real_m = concat(
    batch["real_prefix"], batch["real_prefix_mask"], batch["real"], batch["real_mask"]
  )
  swap_t, swap_m = concat(
    batch["swap_prefix"], batch["swap_prefix_mask"], batch["real"], batch["real_mask"]
  )
  Bp = real_t.shape[0]
  parts_t, parts_m = [real_t, swap_t], [real_m, swap_m]
  labels = [jnp.ones(Bp), jnp.zeros(Bp)]
  kinds = [jnp.zeros(Bp, jnp.int32), jnp.full(Bp, 2, jnp.int32)]
  swap_share = d.swap_fraction if ro is not None else 1.0
  weights = [jnp.ones(Bp), jnp.full(Bp, swap_share)]
  if ro is not None:
    gen_t, gen_m = concat(ro.prefix, ro.prefix_mask, ro.tokens, ro.mask)
    B = gen_t.shape[0]
    w = jnp.full(B, (1.0 - swap_share) * Bp / B)
    if seq_reward is not None:
      w = bootstrap_weights(w, seq_reward, d.bootstrap_ratio)
    parts_t.append(gen_t)
    parts_m.append(gen_m)
    labels.append(jnp.zeros(B))
    kinds.append(jnp.ones(B, jnp.int32))
    weights.append(w)
  cat = lambda xs: jnp.concatenate(xs, axis=0)
  return DiscBatch(cat(parts_t), cat(parts_m), cat(labels), cat(weights), cat(kinds))


def disc_update(
  disc_def, tx, params, opt_state, db: DiscBatch, cfg: Config, frozen=None, scored: int = 0
):
  """One discriminator step on a DiscBatch (the optimizer skips it if the gradients are not
  finite; `disc_finite` reports it). `params` are the trainable half (adapters and head under
  LoRA), `frozen` the base ({} or None without). Returns (params, opt_state, metrics, scores).

  With `scored` = B > 0 the last B rows are the step's rollouts, their bootstrap weights not yet
  applied: the update's forward runs D's weights from before the update, so its logits there are
  D's scores of the rollouts (`scores`, (B,), gradient-free), from which the bootstrap weights
  follow. RLHB then needs no scoring pass of its own (`step.fused_disc_scoring`).
  """

  def loss_fn(p):
    logits = nnx.merge(disc_def, lora.join(p, frozen or {})).last_token(db.tokens, db.mask)[:, 0]
    weights, scores = db.weights, None
    if scored:
      scores = jax.lax.stop_gradient(logits[-scored:])
      reward = losses.reward_from_disc(scores, cfg.ppo.reward_transform)
      gen_w = bootstrap_weights(weights[-scored:], reward, cfg.disc.bootstrap_ratio)
      weights = jnp.concatenate([weights[:-scored], gen_w])
    loss, m = losses.disc_loss(logits, db.labels, weights, cfg.disc.label_smoothing)
    prob = jax.nn.sigmoid(logits)
    for name, kind in (("d_real", 0), ("d_fake", 1), ("d_swap", 2)):
      sel = (db.kind == kind).astype(jnp.float32)
      m[name] = jnp.sum(prob * sel) / jnp.maximum(sel.sum(), 1.0)
    return loss, (m, scores)

  (loss, (metrics, scores)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
  finite = all_finite(loss, grads)  # the optimizer skips the update when the grads are not
  updates, opt_state = tx.update(grads, opt_state, params)
  params = optax.apply_updates(params, updates)
  metrics = {f"disc_{k}" if not k.startswith("d_") else k: v for k, v in metrics.items()}
  return (
    params,
    opt_state,
    metrics
    | {
      "disc_loss": loss,
      "disc_grad_norm": optax.global_norm(grads),
      "disc_finite": finite.astype(jnp.float32),
    },
    scores,
  )


def disc_warmup_step(graphdef, tx, cfg: Config, state: SupervisedState, batch: dict, rng=None):
  """Real logged triplets (label 1) vs. the same triplets with a swapped behavior (label 0)."""
  del rng
  db = disc_batch(batch, None, None, cfg)
  params, opt, metrics, _ = disc_update(
    graphdef, tx, state.params, state.opt, db, cfg, state.frozen
  )
  return state.replace(step=state.step + 1, params=params, opt=opt), metrics


def compile_disc_warmup(graphdef, tx, cfg: Config, shardings=None):
  return jit_step(functools.partial(disc_warmup_step, graphdef, tx, cfg), shardings)


def disc_warmup(run: Run) -> None:
  cfg = run.cfg
  if run.has_params("disc_warmup") or cfg.disc.warmup_steps <= 0:
    return
  actor = run.actor_model(prefer=("sft_actor",))
  disc = build_lib.build_disc(cfg, actor, run.tokenizer.vocab_size)
  tx = optim.make_optimizer(cfg.disc.optim, cfg.disc.warmup_steps)
  compile_fn = lambda graphdef, tx, sh: compile_disc_warmup(graphdef, tx, cfg, sh)
  _, params = train_model(
    run,
    "disc_warmup",
    disc,
    cfg.disc.lora,
    tx,
    compile_fn,
    run.batcher.disc,
    cfg.disc.warmup_steps,
    ("disc_loss", "disc_accuracy", "d_real", "d_swap"),
  )
  run.save_params("disc_warmup", params)
