"""A Llama-family decoder (Llama 2/3, Mistral, SmolLM2, Qwen2) in Flax NNX.

Dimension letters, used in every einsum below:
  B batch, T query length, S key length (cache size), D embed, N query heads, K kv heads,
  G = N // K query heads per kv head, H head dim, F mlp hidden, V vocab, L layers.

The layers are stacked (every layer parameter has a leading L axis) and run with `lax.scan`, so
compile time does not grow with depth. The KV cache is a pytree passed in and returned; the module
holds only parameters.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from rlhb_jax.infra import sharding
from rlhb_jax.model import lora

_MASKED = -1e30  # finite, so fully masked rows (left padding) give a uniform softmax, not NaN


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  vocab_size: int
  embed_dim: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  mlp_dim: int
  rope_theta: float = 10000.0
  # Llama-3 scaling: (factor, low_freq_factor, high_freq_factor, original_max_position) or None.
  rope_scaling: tuple[float, float, float, int] | None = None
  norm_eps: float = 1e-5
  tie_embeddings: bool = True
  qkv_bias: bool = False  # Qwen2
  dtype: str = "float32"  # activations
  param_dtype: str = "float32"
  matmul_dtype: str = ""  # matmul operands, summed in float32; "" = dtype
  remat: bool = False
  # LoRA adapters (model/lora.py): set by lora.attach, never by hand; rank 0 = none.
  lora_rank: int = 0
  lora_alpha: float = 16.0
  lora_targets: tuple[str, ...] = ()

  @property
  def num_params(self) -> int:
    D, N, K, H, F, V, L = (
      self.embed_dim,
      self.num_heads,
      self.num_kv_heads,
      self.head_dim,
      self.mlp_dim,
      self.vocab_size,
      self.num_layers,
    )
    per_layer = D * (N + 2 * K) * H + N * H * D + 3 * D * F + 2 * D
    if self.qkv_bias:
      per_layer += (N + 2 * K) * H
    return L * per_layer + V * D * (1 if self.tie_embeddings else 2) + D


class Cache(NamedTuple):
  """Key/value cache. k, v: (L, B, S, K, H); mask: (B, S) valid keys; index: next write slot."""

  k: jax.Array
  v: jax.Array
  mask: jax.Array
  index: jax.Array

  @classmethod
  def zeros(cls, cfg: LlamaConfig, batch: int, size: int, dtype: str | None = None) -> Cache:
    shape = (cfg.num_layers, batch, size, cfg.num_kv_heads, cfg.head_dim)
    dt = jnp.dtype(dtype or cfg.dtype)
    return cls(
      jnp.zeros(shape, dt),
      jnp.zeros(shape, dt),
      jnp.zeros((batch, size), bool),
      jnp.zeros((), jnp.int32),
    )


class LayerCache(NamedTuple):
  """The decode loop's cache: per layer (tuples of L), keys (B, K, H, S) and values (B, K, S, H).

  Per-layer arrays let each decode step read and update its layer in place (a stacked (L, ...)
  cache inside the layer scan is sliced out and written back every step), and the layouts are
  the ones the attention dots read without a transpose.
  """

  k: tuple[jax.Array, ...]
  v: tuple[jax.Array, ...]
  mask: jax.Array
  index: jax.Array

  @classmethod
  def from_cache(cls, cache: Cache) -> LayerCache:
    L = cache.k.shape[0]
    k = tuple(cache.k[i].transpose(0, 2, 3, 1) for i in range(L))
    v = tuple(cache.v[i].transpose(0, 2, 1, 3) for i in range(L))
    return cls(k, v, cache.mask, cache.index)

  def stacked(self) -> tuple[jax.Array, jax.Array]:
    """Keys and values in `Cache`'s (L, B, S, K, H) layout (for tests)."""
    k = jnp.stack([x.transpose(0, 3, 1, 2) for x in self.k])
    v = jnp.stack([x.transpose(0, 2, 1, 3) for x in self.v])
    return k, v


def _param(rngs: nnx.Rngs, shape, axes, dtype, scale: float | None = None, ones=False) -> nnx.Param:
  if ones:
    value = jnp.ones(shape, dtype)
  else:
    fan_in = shape[-2] if len(shape) >= 2 else shape[-1]
    std = scale if scale is not None else fan_in**-0.5
    value = (std * jax.random.truncated_normal(rngs.params(), -2, 2, shape)).astype(dtype)
  return nnx.Param(value, logical_axes=axes)


class Layers(nnx.Module):
  """All L decoder layers' parameters, stacked on a leading axis."""

  def __init__(self, cfg: LlamaConfig, rngs: nnx.Rngs):
    L, D, N, K, H, F = (
      cfg.num_layers,
      cfg.embed_dim,
      cfg.num_heads,
      cfg.num_kv_heads,
      cfg.head_dim,
      cfg.mlp_dim,
    )
    pd = jnp.dtype(cfg.param_dtype)
    out_scale = (D**-0.5) / (2 * L) ** 0.5  # small residual branches at init
    self.attn_norm = _param(rngs, (L, D), ("layers", "embed"), pd, ones=True)
    self.wq = _param(rngs, (L, D, N, H), ("layers", "embed", "heads", "head_dim"), pd, D**-0.5)
    self.wk = _param(rngs, (L, D, K, H), ("layers", "embed", "kv_heads", "head_dim"), pd, D**-0.5)
    self.wv = _param(rngs, (L, D, K, H), ("layers", "embed", "kv_heads", "head_dim"), pd, D**-0.5)
    self.wo = _param(rngs, (L, N, H, D), ("layers", "heads", "head_dim", "embed"), pd, out_scale)
    if cfg.qkv_bias:
      zeros = lambda *s: jnp.zeros(s, pd)
      self.bq = nnx.Param(zeros(L, N, H), logical_axes=("layers", "heads", "head_dim"))
      self.bk = nnx.Param(zeros(L, K, H), logical_axes=("layers", "kv_heads", "head_dim"))
      self.bv = nnx.Param(zeros(L, K, H), logical_axes=("layers", "kv_heads", "head_dim"))
    self.mlp_norm = _param(rngs, (L, D), ("layers", "embed"), pd, ones=True)
    self.w_gate = _param(rngs, (L, D, F), ("layers", "embed", "mlp"), pd, D**-0.5)
    self.w_up = _param(rngs, (L, D, F), ("layers", "embed", "mlp"), pd, D**-0.5)
    self.w_down = _param(
      rngs, (L, F, D), ("layers", "mlp", "embed"), pd, (F**-0.5) / (2 * L) ** 0.5
    )

  def arrays(self) -> dict[str, jax.Array]:
    return {k: v[...] for k, v in vars(self).items() if isinstance(v, nnx.Param)}


def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
  x32 = x.astype(jnp.float32)
  y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
  return (y * scale.astype(jnp.float32)).astype(x.dtype)


def rope_frequencies(cfg: LlamaConfig) -> jax.Array:
  """Inverse frequencies (H/2,), with Llama-3 wavelength-dependent scaling when configured."""
  H = cfg.head_dim
  inv = 1.0 / (cfg.rope_theta ** (jnp.arange(0, H, 2, dtype=jnp.float32) / H))
  if cfg.rope_scaling is None:
    return inv
  factor, low, high, original = cfg.rope_scaling
  wavelen = 2 * jnp.pi / inv
  low_wavelen, high_wavelen = original / low, original / high
  smooth = (original / wavelen - low) / (high - low)
  mid = (1 - smooth) * inv / factor + smooth * inv
  return jnp.where(wavelen > low_wavelen, inv / factor, jnp.where(wavelen < high_wavelen, inv, mid))


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: jax.Array) -> jax.Array:
  """Rotary embedding in the rotate-half layout. x: (B, T, *, H); positions: (B, T)."""
  angles = positions[:, :, None].astype(jnp.float32) * inv_freq  # (B, T, H/2)
  sin = jnp.sin(angles)[:, :, None, :]
  cos = jnp.cos(angles)[:, :, None, :]
  x32 = x.astype(jnp.float32)
  x1, x2 = jnp.split(x32, 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)


def _qkv(cfg: LlamaConfig, x, p, positions, inv_freq, scale):
  """Normed x -> rotated q (B, T, N, H), rotated k and v (B, T, K, H)."""
  dt = x.dtype
  h = rms_norm(x, p["attn_norm"], cfg.norm_eps)
  q = lora.project(h, p, "q", scale, _mm(cfg))
  k = lora.project(h, p, "k", scale, _mm(cfg))
  v = lora.project(h, p, "v", scale, _mm(cfg))
  if cfg.qkv_bias:
    q, k, v = q + p["bq"].astype(dt), k + p["bk"].astype(dt), v + p["bv"].astype(dt)
  return apply_rope(q, positions, inv_freq), apply_rope(k, positions, inv_freq), v


def _out_and_mlp(cfg: LlamaConfig, x, attn, p, scale):
  """The residual stream after the attention output projection and the MLP."""
  x = x + lora.project(attn, p, "o", scale, _mm(cfg))
  h = rms_norm(x, p["mlp_norm"], cfg.norm_eps)
  gate = lora.project(h, p, "gate", scale, _mm(cfg))
  up = lora.project(h, p, "up", scale, _mm(cfg))
  return x + lora.project(jax.nn.silu(gate) * up, p, "down", scale, _mm(cfg))


def _attend(cfg: LlamaConfig, q, keys, values, allowed, k_layout: str, v_layout: str):
  """Grouped-query attention of q (B, T, N, H) over keys and values laid out as `k_layout` /
  `v_layout` (einsum letters b, s, k, h); allowed: (B, T, S). Returns (B, T, N, H)."""
  B, T = q.shape[:2]
  K, G = cfg.num_kv_heads, cfg.num_heads // cfg.num_kv_heads
  dt = q.dtype
  q = q.reshape(B, T, K, G, cfg.head_dim)
  scores = lora.dot(f"btkgh,{k_layout}->bkgts", q, keys.astype(dt), _mm(cfg), jnp.float32)
  scores = scores * cfg.head_dim**-0.5
  scores = jnp.where(allowed[:, None, None], scores, _MASKED)
  probs = jax.nn.softmax(scores, axis=-1).astype(dt)
  attn = lora.dot(f"bkgts,{v_layout}->btkgh", probs, values.astype(dt), _mm(cfg))
  return attn.reshape(B, T, -1, cfg.head_dim)


def _lora_scale(cfg: LlamaConfig) -> float:
  return cfg.lora_alpha / cfg.lora_rank if cfg.lora_rank else 0.0


def _layer(cfg: LlamaConfig, x, p, k_cache, v_cache, positions, allowed, index, inv_freq):
  """One decoder layer. x: (B, T, D); k_cache/v_cache: (B, S, K, H); allowed: (B, T, S)."""
  x = sharding.constrain_batch(x)
  scale = _lora_scale(cfg)
  q, k, v = _qkv(cfg, x, p, positions, inv_freq, scale)
  if k_cache is None:
    keys, values = k, v
  else:
    keys = jax.lax.dynamic_update_slice(k_cache, k.astype(k_cache.dtype), (0, index, 0, 0))
    values = jax.lax.dynamic_update_slice(v_cache, v.astype(v_cache.dtype), (0, index, 0, 0))
  attn = _attend(cfg, q, keys, values, allowed, "bskh", "bskh")
  return _out_and_mlp(cfg, x, attn, p, scale), k, v


def _decode_layer(cfg: LlamaConfig, x, p, k_cache, v_cache, positions, allowed, index, inv_freq):
  """`_layer` for the decode loop, over a cache laid out for the attention dots: keys
  (B, K, H, S), values (B, K, S, H), so neither is transposed at every step. Returns the new x
  and the updated key and value caches."""
  scale = _lora_scale(cfg)
  q, k, v = _qkv(cfg, x, p, positions, inv_freq, scale)
  k_cache = jax.lax.dynamic_update_slice(
    k_cache, k.transpose(0, 2, 3, 1).astype(k_cache.dtype), (0, 0, 0, index)
  )
  v_cache = jax.lax.dynamic_update_slice(
    v_cache, v.transpose(0, 2, 1, 3).astype(v_cache.dtype), (0, 0, index, 0)
  )
  attn = _attend(cfg, q, k_cache, v_cache, allowed, "bkhs", "bksh")
  return _out_and_mlp(cfg, x, attn, p, scale), k_cache, v_cache


class Transformer(nnx.Module):
  """Decoder-only LM. `trunk` gives final hidden states, `logits` the LM head on top."""

  def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    pd = jnp.dtype(cfg.param_dtype)
    self.embed = _param(
      rngs, (cfg.vocab_size, cfg.embed_dim), ("vocab", "embed"), pd, cfg.embed_dim**-0.5
    )
    self.layers = Layers(cfg, rngs)
    self.final_norm = _param(rngs, (cfg.embed_dim,), ("embed",), pd, ones=True)
    if not cfg.tie_embeddings:
      self.lm_head = _param(rngs, (cfg.embed_dim, cfg.vocab_size), ("embed", "vocab"), pd)

  def trunk(
    self,
    tokens: jax.Array,
    positions: jax.Array,
    mask: jax.Array,
    cache: Cache | None = None,
    adapters: bool = True,
    dtype: str | None = None,
  ) -> tuple[jax.Array, Cache | None]:
    """Final normed hidden states (B, T, D) and the updated cache.

    Args:
      tokens: (B, T) int ids.
      positions: (B, T) RoPE positions (count of real tokens before each one, so left padding
        does not shift them).
      mask: (B, T) True for real tokens, False for padding.
      cache: None for a plain forward; otherwise the T new tokens are written at `cache.index`.
      adapters: False runs the base weights alone, ignoring LoRA adapters (the PPO reference).
      dtype: the compute dtype, if not cfg.dtype (the sampler decodes in its own).
    """
    cfg = self.cfg if dtype is None else dataclasses.replace(self.cfg, dtype=dtype, matmul_dtype="")
    dt = jnp.dtype(cfg.dtype)
    B, T = tokens.shape
    x = sharding.constrain_batch(self.embed[...].astype(dt)[tokens])
    inv_freq = rope_frequencies(cfg)
    if cache is None:
      causal = jnp.tril(jnp.ones((T, T), bool))
      allowed = causal[None] & mask[:, None, :]
      index = 0
      kv_mask = None
    else:
      index = cache.index
      kv_mask, allowed = _cached_attention(cache.mask, mask, index)

    def body(x, xs):
      p, k_c, v_c = xs
      x, k, v = _layer(cfg, x, p, k_c, v_c, positions, allowed, index, inv_freq)
      return x, (k, v)

    if cfg.remat:
      body = jax.checkpoint(body, prevent_cse=False)
    params = self.layers.arrays()
    if not adapters:
      params = lora.strip(params)
    if cache is None:
      x, _ = jax.lax.scan(lambda c, p: body(c, (p, None, None)), x, params)
      new_cache = None
    else:
      x, (k_new, v_new) = jax.lax.scan(body, x, (params, cache.k, cache.v))
      new_cache = Cache(
        jax.lax.dynamic_update_slice(cache.k, k_new.astype(cache.k.dtype), (0, 0, index, 0, 0)),
        jax.lax.dynamic_update_slice(cache.v, v_new.astype(cache.v.dtype), (0, 0, index, 0, 0)),
        kv_mask,
        index + T,
      )
    return rms_norm(x, self.final_norm[...], cfg.norm_eps), new_cache

  def layer_params(self, adapters: bool = True) -> tuple[dict[str, jax.Array], ...]:
    """Each layer's parameters, sliced once out of the stacked arrays (for `decode`)."""
    params = self.layers.arrays()
    if not adapters:
      params = lora.strip(params)
    return tuple({k: v[i] for k, v in params.items()} for i in range(self.cfg.num_layers))

  def decode(
    self,
    tokens: jax.Array,
    positions: jax.Array,
    mask: jax.Array,
    layers: tuple[dict[str, jax.Array], ...],
    cache: LayerCache,
    dtype: str | None = None,
  ) -> tuple[jax.Array, LayerCache]:
    """`trunk` with a cache, for the sampler's decode loop: the layers unrolled over per-layer
    weights (`layer_params`, sliced once before the loop) and per-layer cache arrays.

    Inside a `lax.scan` over stacked layers, XLA on the CPU copies every layer's weights out of the
    stacked arrays at every step; here each step reads them where they lie. Same math as `trunk`.
    """
    cfg = self.cfg if dtype is None else dataclasses.replace(self.cfg, dtype=dtype, matmul_dtype="")
    dt = jnp.dtype(cfg.dtype)
    x = sharding.constrain_batch(self.embed[...].astype(dt)[tokens])
    inv_freq = rope_frequencies(cfg)
    index = cache.index
    kv_mask, allowed = _cached_attention(cache.mask, mask, index)
    ks, vs = [], []
    for p, k_c, v_c in zip(layers, cache.k, cache.v, strict=True):
      x, k_c, v_c = _decode_layer(cfg, x, p, k_c, v_c, positions, allowed, index, inv_freq)
      ks.append(k_c)
      vs.append(v_c)
    h = rms_norm(x, self.final_norm[...], cfg.norm_eps)
    return h, LayerCache(tuple(ks), tuple(vs), kv_mask, index + tokens.shape[1])

  def logits(self, h: jax.Array, dtype: str | None = None) -> jax.Array:
    """LM head: (B, T, D) -> (B, T, V) float32; `dtype` as `trunk`'s (matmul operands)."""
    mm = dtype or _mm(self.cfg)
    if self.cfg.tie_embeddings:
      return lora.dot("btd,vd->btv", h, self.embed[...].astype(h.dtype), mm, jnp.float32)
    return lora.dot("btd,dv->btv", h, self.lm_head[...].astype(h.dtype), mm, jnp.float32)

  def __call__(self, tokens, positions, mask, cache=None, adapters: bool = True):
    h, cache = self.trunk(tokens, positions, mask, cache, adapters)
    return self.logits(h), cache


def _mm(cfg: LlamaConfig) -> str:
  """The dtype matmul operands take (`matmul_dtype`, default the activations' `dtype`)."""
  return cfg.matmul_dtype or cfg.dtype


def _cached_attention(cache_mask: jax.Array, mask: jax.Array, index) -> tuple[jax.Array, jax.Array]:
  """(the cache's key mask with the T new tokens written at `index`, (B, T, S) allowed keys)."""
  T = mask.shape[1]
  kv_mask = jax.lax.dynamic_update_slice(cache_mask, mask, (0, index))
  key_pos = jnp.arange(cache_mask.shape[1])[None, :]
  query_pos = index + jnp.arange(T)[:, None]
  return kv_mask, (key_pos <= query_pos)[None] & kv_mask[:, None, :]


def positions_from_mask(mask: jax.Array, offset: jax.Array | int = 0) -> jax.Array:
  """RoPE positions of left-padded rows: index among the row's real tokens (pads get 0)."""
  return jnp.maximum(jnp.cumsum(mask.astype(jnp.int32), axis=-1) - 1, 0) + offset
