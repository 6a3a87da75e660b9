"""Supervised steps: behavior-conditioned SFT of the generator and discriminator warm-up."""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct

from rlhb_jax import losses, steps
from rlhb_jax.config import Config
from rlhb_jax.model import lora


@struct.dataclass
class SupervisedState:
  """One model in training: its trainable params (all, or LoRA adapters and head) and optimizer
  state; `frozen` holds the rest of the model ({} without LoRA). `ref` is a frozen copy of the
  starting params for the offline preference steps without LoRA ({} otherwise: under LoRA the
  reference is the base with adapters off)."""

  step: jax.Array
  params: Any
  opt: Any
  frozen: Any = struct.field(default_factory=dict)
  ref: Any = struct.field(default_factory=dict)

  def full(self, params: Any) -> Any:
    return lora.join(params, self.frozen)


def init(
  params: Any, tx: optax.GradientTransformation, frozen: Any = None, ref: Any = None
) -> SupervisedState:
  return SupervisedState(jnp.zeros((), jnp.int32), params, tx.init(params), frozen or {}, ref or {})


def sft_step(graphdef, tx, state: SupervisedState, batch: dict, rng=None):
  """Token cross-entropy on the logged response given the prompt with its logged behavior.

  loss = -sum_t m_t log p(y_t | prompt, y_<t) / (sum_t m_t + eps), m the response mask.
  """
  del rng

  def loss_fn(params):
    logits = steps.policy_logits(
      graphdef,
      state.full(params),
      batch["prompt"],
      batch["prompt_mask"],
      batch["response"],
      batch["response_mask"],
    )
    return losses.sft_loss(logits, batch["response"], batch["response_mask"].astype(jnp.float32))

  (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  return apply_grads(tx, state, loss, metrics, grads)


def apply_grads(tx, state: SupervisedState, loss, metrics: dict, grads):
  """One optimizer update of a supervised state; skipped (state kept) if loss or grads are
  non-finite. Adds loss and grad_norm to the metrics."""
  finite = steps.all_finite(loss, grads)
  updates, opt = tx.update(grads, state.opt, state.params)
  params = optax.apply_updates(state.params, updates)
  params, opt = steps.where_finite(finite, (params, opt), (state.params, state.opt))
  metrics = {**metrics, "loss": loss, "grad_norm": optax.global_norm(grads)}
  return state.replace(step=state.step + 1, params=params, opt=opt), metrics


def disc_warmup_step(graphdef, tx, cfg: Config, state: SupervisedState, batch: dict, rng=None):
  """Real logged triplets (label 1) vs. the same triplets with a swapped behavior (label 0)."""
  del rng
  db = steps.disc_batch(batch, None, None, cfg)
  params, opt, metrics = steps.disc_update(
    graphdef, tx, state.params, state.opt, db, cfg, state.frozen
  )
  return state.replace(step=state.step + 1, params=params, opt=opt), metrics


def jit_step(step_fn, shardings: tuple | None = None):
  """`step_fn(state, batch, rng) -> (state, metrics)` jitted with the state donated; with
  `shardings` = (state, batch, replicated) shardings, as one program over the mesh (metrics
  replicated)."""
  if shardings is None:
    return jax.jit(step_fn, donate_argnums=(0,))
  state_sh, batch_sh, rep = shardings
  return jax.jit(
    step_fn,
    in_shardings=(state_sh, batch_sh, rep),
    out_shardings=(state_sh, rep),
    donate_argnums=(0,),
  )


def compile_sft(graphdef, tx, shardings=None):
  return jit_step(functools.partial(sft_step, graphdef, tx), shardings)


def compile_disc_warmup(graphdef, tx, cfg: Config, shardings=None):
  return jit_step(functools.partial(disc_warmup_step, graphdef, tx, cfg), shardings)
