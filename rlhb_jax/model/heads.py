"""Scalar heads on a decoder trunk: critic (per-token value), discriminator, RM, classifier."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from rlhb_jax.model.llama import LlamaConfig, Transformer, positions_from_mask


class ScalarModel(nnx.Module):
  """A `Transformer` trunk with a linear head of M outputs on its hidden states."""

  def __init__(self, cfg: LlamaConfig, num_outputs: int = 1, *, rngs: nnx.Rngs):
    self.lm = Transformer(cfg, rngs=rngs)
    self.head_w = nnx.Param(
      jnp.zeros((cfg.embed_dim, num_outputs), jnp.dtype(cfg.param_dtype)),
      logical_axes=("embed", "out"),
    )
    self.head_b = nnx.Param(jnp.zeros((num_outputs,), jnp.float32), logical_axes=("out",))

  def per_token(self, tokens: jax.Array, mask: jax.Array) -> jax.Array:
    """Head outputs at every position: (B, T) tokens -> (B, T, M) f32."""
    h, _ = self.lm.trunk(tokens, positions_from_mask(mask), mask)
    out = jnp.einsum("btd,dm->btm", h, self.head_w[...].astype(h.dtype)).astype(jnp.float32)
    return out + self.head_b[...]

  def last_token(self, tokens: jax.Array, mask: jax.Array) -> jax.Array:
    """Head outputs at each row's last real token: (B, T) -> (B, M) f32."""
    out = self.per_token(tokens, mask)
    last = last_index(mask)
    return jnp.take_along_axis(out, last[:, None, None], axis=1)[:, 0]


def last_index(mask: jax.Array) -> jax.Array:
  """Index of the last True in each row of a (B, T) mask (0 for an empty row)."""
  T = mask.shape[1]
  idx = jnp.where(mask, jnp.arange(T)[None, :], -1)
  return jnp.maximum(idx.max(axis=1), 0)
