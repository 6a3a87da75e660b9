"""LoRA adapters on the stacked decoder layers, and the trainable / frozen split of a role.

An adapted projection computes  y = x W + (alpha / r) (x A) B  with A (in, r) and B (r, out); B
starts at zero, so a freshly adapted model computes exactly what its base does. The adapters of
every layer are stacked like the base weights (leading L axis) and live next to them in `Layers`
as `lora_<target>_a` / `lora_<target>_b`, with logical axes, so the rules table shards them.

Only adapters (and a scalar model's head) are trained; the base stays frozen and is shared by the
role's forward with adapters off: the PPO reference policy is the actor's base, not a copy.
A stage ends by folding its adapters into the base (`merge_params`), so what it saves under
`models/` is a plain model that the next stage (or another tool) reads without knowing LoRA.

Dimension letters as in llama.py; R is the adapter rank.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

Params = Any


class Target(NamedTuple):
  """One adaptable projection: its base weight, the adapters' logical axes, and the einsums of
  the base projection, of x A, of (x A) B, and of the stacked update A B in the weight's layout."""

  weight: str
  a_axes: tuple[str, ...]
  b_axes: tuple[str, ...]
  base: str
  down: str
  up: str
  delta: str


_IN, _HEADS, _KV = ("layers", "embed", "lora"), ("heads", "head_dim"), ("kv_heads", "head_dim")
# fmt: off
TARGETS = {
  "q": Target("wq", _IN, ("layers", "lora", *_HEADS),
              "btd,dnh->btnh", "btd,dr->btr", "btr,rnh->btnh", "ldr,lrnh->ldnh"),
  "k": Target("wk", _IN, ("layers", "lora", *_KV),
              "btd,dkh->btkh", "btd,dr->btr", "btr,rkh->btkh", "ldr,lrkh->ldkh"),
  "v": Target("wv", _IN, ("layers", "lora", *_KV),
              "btd,dkh->btkh", "btd,dr->btr", "btr,rkh->btkh", "ldr,lrkh->ldkh"),
  "o": Target("wo", ("layers", *_HEADS, "lora"), ("layers", "lora", "embed"),
              "btnh,nhd->btd", "btnh,nhr->btr", "btr,rd->btd", "lnhr,lrd->lnhd"),
  "gate": Target("w_gate", _IN, ("layers", "lora", "mlp"),
                 "btd,df->btf", "btd,dr->btr", "btr,rf->btf", "ldr,lrf->ldf"),
  "up": Target("w_up", _IN, ("layers", "lora", "mlp"),
               "btd,df->btf", "btd,dr->btr", "btr,rf->btf", "ldr,lrf->ldf"),
  "down": Target("w_down", ("layers", "mlp", "lora"), ("layers", "lora", "embed"),
                 "btf,fd->btd", "btf,fr->btr", "btr,rd->btd", "lfr,lrd->lfd"),
}
# fmt: on
HEAD_KEYS = ("head_w", "head_b")  # a ScalarModel's head: trained with the adapters


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  """LoRA for one role. rank 0 = full fine-tuning (every weight trained, no adapters)."""

  rank: int = 0
  alpha: float = 16.0  # the update is scaled by alpha / rank
  targets: tuple[str, ...] = ("q", "k", "v", "o", "gate", "up", "down")

  def __post_init__(self):
    unknown = set(self.targets) - set(TARGETS)
    if unknown:
      raise ValueError(f"lora.targets: unknown {sorted(unknown)}; known: {sorted(TARGETS)}")
    if self.rank < 0:
      raise ValueError(f"lora.rank={self.rank}: must be >= 0")

  @property
  def scale(self) -> float:
    return self.alpha / self.rank if self.rank else 0.0


def attach(lm, cfg: LoraConfig, seed: int) -> None:
  """Adds fresh adapters (A random, B zero) to a `Transformer` in place; rank 0 does nothing."""
  if cfg.rank == 0:
    return
  if lm.cfg.lora_rank:
    raise ValueError("the model already has adapters: merge them first")
  layers = lm.layers
  key = jax.random.key(seed)
  for i, t in enumerate(cfg.targets):
    w_name, a_axes, b_axes = TARGETS[t][:3]
    w = getattr(layers, w_name)[...]
    n_in = len(a_axes) - 2  # the base weight's input axes (minus "layers" and "lora")
    L, in_shape, out_shape = w.shape[0], w.shape[1 : 1 + n_in], w.shape[1 + n_in :]
    fan_in = math.prod(in_shape)
    a = jax.random.normal(jax.random.fold_in(key, i), (L, *in_shape, cfg.rank)) * fan_in**-0.5
    b = jnp.zeros((L, cfg.rank, *out_shape))
    setattr(layers, f"lora_{t}_a", nnx.Param(a.astype(w.dtype), logical_axes=a_axes))
    setattr(layers, f"lora_{t}_b", nnx.Param(b.astype(w.dtype), logical_axes=b_axes))
  lm.cfg = dataclasses.replace(
    lm.cfg, lora_rank=cfg.rank, lora_alpha=cfg.alpha, lora_targets=tuple(cfg.targets)
  )


def delta(p: dict, target: str, scale: float) -> jax.Array:
  """The stacked update (alpha / r) A B of one target, in its base weight's (L, ...) layout."""
  a, b = p[f"lora_{target}_a"], p[f"lora_{target}_b"]
  return scale * jnp.einsum(TARGETS[target].delta, a.astype(jnp.float32), b.astype(jnp.float32))


def project(x: jax.Array, p: dict, target: str, scale: float, mm: str | None = None) -> jax.Array:
  """x W for one layer's params `p`, plus (alpha / r) (x A) B when `p` holds that adapter; the
  matmuls take `mm` inputs (default x's dtype), summed in float32 (`dot`).

  The adapter runs as two thin einsums through the rank axis, O(r (in + out)) per token.
  """
  t = TARGETS[target]
  w = p[t.weight].astype(x.dtype)
  if x.ndim == 4:  # (B, T, N, H) @ (N, H, D) as one 2-D matmul: XLA would transpose w every call
    y = dot("bti,io->bto", x.reshape(*x.shape[:2], -1), w.reshape(-1, w.shape[-1]), mm)
  else:
    y = dot(t.base, x, w, mm)
  a = p.get(f"lora_{target}_a")
  if a is None:
    return y
  xa = dot(t.down, x, a.astype(x.dtype), mm)
  return y + scale * dot(t.up, xa, p[f"lora_{target}_b"].astype(x.dtype), mm)


def dot(spec: str, x: jax.Array, w: jax.Array, mm: str | None = None, out=None) -> jax.Array:
  """einsum(spec, x, w) with `mm` inputs (default x's dtype) summed in float32, returned in `out`
  (default x's dtype). Float32 throughout is the plain einsum.

  With bfloat16 inputs the forward and both backward matmuls take bfloat16 operands and accumulate
  in float32 (`_mixed_dot`), where XLA on a CPU with AMX is about twice as fast as float32; a
  bfloat16 x bfloat16 -> bfloat16 dot is slower than float32 there (docs/PERFORMANCE.md).
  """
  mm = jnp.dtype(mm or x.dtype)
  out = jnp.dtype(out or x.dtype)
  if mm == jnp.float32 and x.dtype == jnp.float32 and w.dtype == jnp.float32:
    y = x @ w if spec == "bti,io->bto" else jnp.einsum(spec, x, w)
    return y.astype(out)
  return _mixed_dot(spec, mm, out, x, w)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _mixed_dot(spec: str, mm, out, x: jax.Array, w: jax.Array) -> jax.Array:
  f32 = jnp.float32
  return jnp.einsum(spec, x.astype(mm), w.astype(mm), preferred_element_type=f32).astype(out)


def _mixed_dot_fwd(spec, mm, out, x, w):
  return _mixed_dot(spec, mm, out, x, w), (x, w)


def _mixed_dot_bwd(spec, mm, out, res, g):
  """dx = g W^T and dW = x^T g as einsums of the same letters, `mm` operands, float32 sums."""
  x, w = res
  lhs, o = spec.split("->")
  xs, ws = lhs.split(",")
  g = g.astype(mm)
  f32 = jnp.float32
  dx = jnp.einsum(f"{o},{ws}->{xs}", g, w.astype(mm), preferred_element_type=f32)
  dw = jnp.einsum(f"{xs},{o}->{ws}", x.astype(mm), g, preferred_element_type=f32)
  return dx.astype(x.dtype), dw.astype(w.dtype)


_mixed_dot.defvjp(_mixed_dot_fwd, _mixed_dot_bwd)


def strip(p: dict) -> dict:
  """A layer dict without its adapters (the base alone: adapters off)."""
  return {k: v for k, v in p.items() if not k.startswith("lora_")}


def without_adapters(tree: Any) -> Any:
  """A params-shaped dict tree without its adapters' leaves (`lora_*` keys, at any depth)."""
  if not isinstance(tree, dict):
    return tree
  return {k: without_adapters(v) for k, v in tree.items() if not str(k).startswith("lora_")}


def merge_params(params: Params, scale: float) -> Params:
  """A params tree (pure dict) with every adapter folded into its base weight and removed."""
  if not isinstance(params, dict):
    return params
  out = {k: merge_params(v, scale) for k, v in params.items() if not k.startswith("lora_")}
  for t, spec in TARGETS.items():
    w_name = spec.weight
    if f"lora_{t}_a" in params:
      w = params[w_name]
      out[w_name] = (w.astype(jnp.float32) + delta(params, t, scale)).astype(w.dtype)
  return out


def merge(lm) -> None:
  """Folds a `Transformer`'s adapters into its base weights in place and removes them."""
  if not lm.cfg.lora_rank:
    return
  layers = lm.layers
  scale = lm.cfg.lora_alpha / lm.cfg.lora_rank
  arrays = layers.arrays()
  for t in lm.cfg.lora_targets:
    w_name = TARGETS[t].weight
    w = arrays[w_name]
    getattr(layers, w_name).set_value(
      (w.astype(jnp.float32) + delta(arrays, t, scale)).astype(w.dtype)
    )
    delattr(layers, f"lora_{t}_a")
    delattr(layers, f"lora_{t}_b")
  lm.cfg = dataclasses.replace(lm.cfg, lora_rank=0, lora_targets=())


def is_trainable(path: tuple[str, ...]) -> bool:
  return any(str(k).startswith("lora_") or k in HEAD_KEYS for k in path)


def split(params: Params, use_lora: bool) -> tuple[Params, Params]:
  """(trainable, frozen) halves of a pure-dict params tree: adapters and heads vs. the rest; with
  `use_lora` False everything is trainable and frozen is {}."""
  if not use_lora:
    return params, {}

  def go(tree, path):
    train, frozen = {}, {}
    for k, v in tree.items():
      if isinstance(v, dict):
        t, f = go(v, (*path, k))
        if t:
          train[k] = t
        if f:
          frozen[k] = f
      elif is_trainable((*path, k)):
        train[k] = v
      else:
        frozen[k] = v
    return train, frozen

  return go(params, ())


def join(trainable: Params, frozen: Params) -> Params:
  """The inverse of `split`: a deep merge of two disjoint dict trees."""
  if not frozen:
    return trainable
  if not trainable:
    return frozen
  out = dict(frozen)
  for k, v in trainable.items():
    out[k] = join(v, frozen[k]) if isinstance(v, dict) and k in frozen else v
  return out


def count(params: Params) -> int:
  return sum(int(x.size) for x in jax.tree.leaves(params))
