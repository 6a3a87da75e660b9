"""Behavior-conditioned SFT of the generator: the step and the stage."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from rlhb_jax.run import Run
from rlhb_jax.training import forward, losses, optim
from rlhb_jax.training.trainable import SupervisedState, apply_grads, jit_step, train_model


def sft_step(graphdef, tx, state: SupervisedState, batch: dict, rng=None):
  """Token cross-entropy on the logged response given the prompt with its logged behavior.

  loss = -sum_t m_t log p(y_t | prompt, y_<t) / (sum_t m_t + eps), m the response mask.
  """
  del rng

  def loss_fn(params):
    logits = forward.policy_logits(
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


def compile_sft(graphdef, tx, shardings=None):
  return jit_step(functools.partial(sft_step, graphdef, tx), shardings)


def sft(run: Run) -> None:
  cfg = run.cfg
  if run.has_params("sft_actor") or cfg.sft.steps <= 0:
    return
  tx = optim.make_optimizer(cfg.sft.optim, cfg.sft.steps)
  _, params = train_model(
    run,
    "sft",
    run.base_actor(),
    cfg.lora,
    tx,
    compile_sft,
    run.batcher.sft,
    cfg.sft.steps,
    ("loss", "accuracy"),
  )
  run.save_params("sft_actor", params)
