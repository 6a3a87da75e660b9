"""Sampling from the generator: a jitted prefill and a `lax.scan` decode loop over a KV cache,
with greedy, temperature, top-k and top-p choice, in the decode dtype (`SamplingConfig.dtype`)."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rlhb_jax.data.batches import pad_prompts
from rlhb_jax.model import precision
from rlhb_jax.model.config import SamplingConfig
from rlhb_jax.model.llama import Cache, LayerCache, Transformer, positions_from_mask


class SampleOutput(NamedTuple):
  tokens: jax.Array  # (B, Tn) int32; padding after EOS
  logprobs: jax.Array  # (B, Tn) f32: log-softmax(logits / temperature) at the chosen token
  mask: jax.Array  # (B, Tn) bool completion mask: generated tokens up to and including EOS


def _filter_logits(logits: jax.Array, cfg: SamplingConfig) -> jax.Array:
  """Top-k then top-p (nucleus) filtering of (B, V) logits already divided by temperature."""
  if cfg.top_k > 0:
    kth = jax.lax.top_k(logits, cfg.top_k)[0][:, -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if cfg.top_p < 1.0:
    sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    # Keep the smallest prefix whose mass reaches top_p (the first token is always kept).
    exclusive = jnp.cumsum(probs, axis=-1) - probs
    cutoff_idx = jnp.sum(exclusive < cfg.top_p, axis=-1, keepdims=True) - 1
    cutoff = jnp.take_along_axis(sorted_logits, cutoff_idx, axis=-1)
    logits = jnp.where(logits < cutoff, -jnp.inf, logits)
  return logits


def _choose(logits: jax.Array, key: jax.Array, cfg: SamplingConfig) -> tuple[jax.Array, jax.Array]:
  """Picks one token per row from (B, V) f32 logits; returns (token, its log-prob)."""
  if cfg.greedy:
    token = jnp.argmax(logits, axis=-1)
    logp = jax.nn.log_softmax(logits, axis=-1)
  else:
    scaled = logits / cfg.temperature
    token = jax.random.categorical(key, _filter_logits(scaled, cfg), axis=-1)
    logp = jax.nn.log_softmax(scaled, axis=-1)
  return token.astype(jnp.int32), jnp.take_along_axis(logp, token[:, None], axis=-1)[:, 0]


def unroll_decode(cfg: SamplingConfig) -> bool:
  """Whether the decode loop unrolls the layers (`SamplingConfig.decode_layers`)."""
  if cfg.decode_layers not in ("auto", "unroll", "scan"):
    raise ValueError(f"sampling.decode_layers={cfg.decode_layers!r}: auto | unroll | scan")
  if cfg.decode_layers == "auto":
    return jax.default_backend() == "cpu"
  return cfg.decode_layers == "unroll"


def decode_dtype(cfg: SamplingConfig) -> str | None:
  """The dtype the decode loop computes in, activations and matmuls (`SamplingConfig.dtype`); None
  computes as the model is configured (its `dtype` and `matmul_dtype`)."""
  if cfg.dtype == "auto":
    return "float32" if jax.default_backend() == "cpu" else None
  return None if cfg.dtype == "model" else cfg.dtype


def decodes_as_trained(cfg: SamplingConfig, spec) -> bool:
  """Whether the sampler computes exactly as the training forward of a model built from `spec`
  (a `ModelSpec`: `dtype`, `matmul_dtype`)."""
  dtype = decode_dtype(cfg)
  matmul = precision.matmul_dtype(spec.matmul_dtype) or spec.dtype
  return dtype is None or (spec.dtype == dtype and matmul == dtype)


def sample(
  model: Transformer,
  prompt_tokens: jax.Array,
  prompt_mask: jax.Array,
  rng: jax.Array,
  cfg: SamplingConfig,
  eos_ids: tuple[int, ...],
  pad_id: int = 0,
) -> SampleOutput:
  """Samples `cfg.max_new_tokens` tokens after left-padded prompts (B, P). Traceable under jit."""
  B, P = prompt_tokens.shape
  Tn = cfg.max_new_tokens
  dtype = decode_dtype(cfg)
  cache = Cache.zeros(model.cfg, B, P + Tn, dtype)
  positions = positions_from_mask(prompt_mask)
  h, cache = model.trunk(prompt_tokens, positions, prompt_mask, cache, dtype=dtype)
  logits = model.logits(h[:, -1:], dtype)[:, 0]
  next_pos = prompt_mask.sum(axis=-1).astype(jnp.int32)
  eos = jnp.asarray(eos_ids, jnp.int32)
  unroll = unroll_decode(cfg)
  if unroll:  # weights and cache sliced per layer once, here (`Transformer.decode`)
    layers = model.layer_params()
    cache = LayerCache.from_cache(cache)

  def forward(tok, pos, live, cache):
    if unroll:
      return model.decode(tok, pos, live, layers, cache, dtype)
    return model.trunk(tok, pos, live, cache, dtype=dtype)

  def step(carry, key):
    logits, cache, pos, done = carry
    token, logp = _choose(logits, key, cfg)
    token = jnp.where(done, pad_id, token)
    live = ~done
    done = done | jnp.isin(token, eos)
    h, cache = forward(token[:, None], pos[:, None], live[:, None], cache)
    return (model.logits(h, dtype)[:, 0], cache, pos + 1, done), (
      token,
      jnp.where(live, logp, 0.0),
      live,
    )

  keys = jax.random.split(rng, Tn)

  # A while loop rather than a scan over all Tn steps: it stops once every row has ended. The steps
  # it skips would write only padding (token pad_id, log-prob 0, not live), which the buffers
  # already hold, so the outputs are those of the full scan.
  def body(carry):
    i, inner, out = carry
    inner, (token, logp, live) = step(inner, keys[i])
    out = tuple(
      jax.lax.dynamic_update_index_in_dim(o, x, i, 0)
      for o, x in zip(out, (token, logp, live), strict=True)
    )
    return i + 1, inner, out

  def cond(carry):
    i, (_, _, _, done), _ = carry
    return (i < Tn) & ~jnp.all(done)

  done0 = jnp.zeros((B,), bool)
  out0 = (
    jnp.full((Tn, B), pad_id, jnp.int32),
    jnp.zeros((Tn, B), jnp.float32),
    jnp.zeros((Tn, B), bool),
  )
  _, _, (tokens, logprobs, live) = jax.lax.while_loop(
    cond, body, (jnp.int32(0), (logits, cache, next_pos, done0), out0)
  )
  return SampleOutput(tokens.T, logprobs.T, live.T)


@functools.partial(jax.jit, static_argnames=("cfg", "eos_ids", "pad_id"))
def sample_jit(graphdef, params, prompt_tokens, prompt_mask, rng, *, cfg, eos_ids, pad_id=0):
  """`sample` on a split model: jit-compiled once per (graphdef, bucket, batch, cfg)."""
  model = nnx.merge(graphdef, params)
  return sample(model, prompt_tokens, prompt_mask, rng, cfg, eos_ids, pad_id)


def generate_texts(
  model: Transformer,
  tokenizer,
  prompts: Sequence[Sequence[int]],
  rng: jax.Array,
  cfg: SamplingConfig,
  batch_size: int,
) -> list[tuple[list[int], str]]:
  """Host-side convenience: samples every prompt (in fixed-size batches) and decodes the responses.

  The last batch is padded with copies of the first prompt so the batch shape never changes.
  """
  graphdef, params = nnx.split(model)
  out = []
  for start in range(0, len(prompts), batch_size):
    chunk = list(prompts[start : start + batch_size])
    n = len(chunk)
    chunk += [chunk[0]] * (batch_size - n)
    tokens, mask = pad_prompts(chunk, cfg.prompt_buckets, tokenizer.pad_id)
    key = jax.random.fold_in(rng, start)
    res = sample_jit(
      graphdef,
      params,
      tokens,
      mask,
      key,
      cfg=cfg,
      eos_ids=tokenizer.eos_ids,
      pad_id=tokenizer.pad_id,
    )
    toks, live = np.asarray(res.tokens), np.asarray(res.mask)
    for i in range(n):
      ids = [int(t) for t, m in zip(toks[i], live[i], strict=True) if m]
      ids = [t for t in ids if t not in tokenizer.eos_ids]
      out.append((ids, tokenizer.decode(ids)))
  return out
