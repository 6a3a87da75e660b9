"""Forward passes every method shares: teacher-forced logits, per-token and per-sequence
log-probs, critic values, and the implicit rewards of the preference methods.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from rlhb_jax.model.llama import positions_from_mask
from rlhb_jax.training.trainable import SupervisedState

Params = Any


def concat(a, a_mask, b, b_mask):
  return jnp.concatenate([a, b], axis=1), jnp.concatenate([a_mask, b_mask], axis=1)


def policy_logits(
  actor_def,
  actor: Params,
  prompt,
  prompt_mask,
  response,
  response_mask,
  temperature: float = 1.0,
  adapters: bool = True,
):
  """Teacher-forced logits (B, Tn, V) that predict each response token, divided by the sampling
  temperature so that PPO's ratios and KL are those of the distribution the rollouts came from.
  `adapters=False` runs the base weights alone (the reference policy under LoRA)."""
  P, Tn = prompt.shape[1], response.shape[1]
  tokens, mask = concat(prompt, prompt_mask, response, response_mask)
  model = nnx.merge(actor_def, actor)
  h, _ = model.trunk(tokens, positions_from_mask(mask), mask, adapters=adapters)
  logits = model.logits(h[:, P - 1 : P - 1 + Tn])
  return logits if temperature == 1.0 else logits / temperature


def token_logprobs(logits: jax.Array, tokens: jax.Array) -> jax.Array:
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return jnp.take_along_axis(logp, tokens[..., None], axis=-1)[..., 0]


def critic_values(critic_def, critic: Params, prompt, prompt_mask, response, response_mask):
  """Value of the state before each response token: (B, Tn)."""
  P, Tn = prompt.shape[1], response.shape[1]
  tokens, mask = concat(prompt, prompt_mask, response, response_mask)
  out = nnx.merge(critic_def, critic).per_token(tokens, mask)[..., 0]
  return out[:, P - 1 : P - 1 + Tn]


def sequence_logprobs(
  graphdef, params, prompt, prompt_mask, response, response_mask, adapters: bool = True
) -> jax.Array:
  """log pi(response | prompt) summed over the response mask: (B,)."""
  logits = policy_logits(
    graphdef, params, prompt, prompt_mask, response, response_mask, adapters=adapters
  )
  lp = token_logprobs(logits, response)
  return jnp.sum(jnp.where(response_mask, lp, 0.0), axis=1)


def reference_logprobs(graphdef, state: SupervisedState, *rows) -> jax.Array:
  """The frozen reference's sequence log-probs: the copy in `state.ref`, or under LoRA the
  model's base with adapters off."""
  if state.ref:
    lp = sequence_logprobs(graphdef, state.ref, *rows)
  else:
    lp = sequence_logprobs(graphdef, state.full(state.params), *rows, adapters=False)
  return jax.lax.stop_gradient(lp)


def stack_twice(x: jax.Array) -> jax.Array:
  return jnp.concatenate([x, x], axis=0)


@functools.partial(jax.jit, static_argnums=0)
def implicit_rewards(graphdef, params, ref_params, prompt, prompt_mask, response, response_mask):
  """log pi(y | x) - log pi_ref(y | x) per row, both full (merged) parameter trees: (B,)."""
  rows = (prompt, prompt_mask, response, response_mask)
  return sequence_logprobs(graphdef, params, *rows) - sequence_logprobs(graphdef, ref_params, *rows)
