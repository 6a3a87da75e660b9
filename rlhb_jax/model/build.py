"""Each role's model: the generator LM, a scalar model from it (critic, D, RM,
classifier), LoRA adapters on a role, and its (trainable, frozen) params.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from rlhb_jax.config import Config, ModelSpec
from rlhb_jax.model import lora, precision
from rlhb_jax.model.heads import ScalarModel
from rlhb_jax.model.llama import LlamaConfig, Transformer

# The ModelSpec fields a tiny model's LlamaConfig takes as they are.
_TINY_FIELDS = (
  *("embed_dim", "num_layers", "num_heads", "num_kv_heads", "head_dim", "mlp_dim", "rope_theta"),
  *("tie_embeddings", "dtype", "matmul_dtype", "param_dtype", "remat"),
)


def tiny_llama_config(spec: ModelSpec, vocab_size: int) -> LlamaConfig:
  fields = {f: getattr(spec, f) for f in _TINY_FIELDS}
  fields["matmul_dtype"] = precision.matmul_dtype(spec.matmul_dtype)
  return LlamaConfig(vocab_size=vocab_size, **fields)


def build_lm(spec: ModelSpec, vocab_size: int, seed: int) -> tuple[Transformer, Any]:
  """The generator LM and, for a checkpoint, its tokenizer (None for `tiny`)."""
  if spec.source == "tiny":
    return Transformer(tiny_llama_config(spec, vocab_size), rngs=nnx.Rngs(seed)), None
  from rlhb_jax.model import loading

  return loading.load_model(spec)


def scalar_from_lm(lm: Transformer, num_outputs: int, seed: int) -> ScalarModel:
  """A ScalarModel whose trunk starts as a copy of `lm` (critic from generator, RM, classifier)."""
  model = ScalarModel(lm.cfg, num_outputs, rngs=nnx.Rngs(seed))
  nnx.update(model.lm, jax.tree.map(jnp.copy, nnx.state(lm, nnx.Param)))
  return model


def build_disc(
  cfg: Config, actor: Transformer, vocab_size: int, num_outputs: int = 1, seed_offset: int = 2
) -> ScalarModel:
  """The discriminator: from the generator's weights, a fresh tiny trunk, or its own checkpoint.

  The baselines' reward model (M=1) and behavior classifier (M=K*N) are built the same way, so
  every judge of the generator has the same size and initialisation (`config.disc`).
  """
  seed = cfg.seed + seed_offset
  if cfg.disc.init_from_generator:
    return scalar_from_lm(actor, num_outputs, seed)
  if cfg.disc.model.source == "tiny":
    spec = tiny_llama_config(cfg.disc.model, vocab_size)
    return ScalarModel(spec, num_outputs, rngs=nnx.Rngs(seed))
  lm, _ = build_lm(cfg.disc.model, vocab_size, seed)
  return scalar_from_lm(lm, num_outputs, seed)


def params_of(model: nnx.Module):
  return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def trunk_of(model: nnx.Module | None):
  """The decoder of a role (the Transformer itself, or a ScalarModel's trunk)."""
  return getattr(model, "lm", model)


def has_lora(model: nnx.Module | None) -> bool:
  return model is not None and bool(trunk_of(model).cfg.lora_rank)


def split_params(model: nnx.Module | None) -> tuple[Any, Any]:
  """(trainable, frozen) params of a role: adapters and head vs. base under LoRA, else all
  vs. {}."""
  if model is None:
    return {}, {}
  return lora.split(params_of(model), has_lora(model))


def merged_params(trainable: Any, frozen: Any, spec: lora.LoraConfig) -> Any:
  """A role's params with its adapters (of `spec`) folded into the base: the tree of the plain
  model, as `models/<name>` stores it. The merge runs where the weights are: each merged weight
  keeps its base weight's sharding, so in a multi-process run every leaf is a global array that
  Orbax saves from all processes together. Without adapters these are the state's own arrays;
  `sharding.to_host` copies them when the state trains on."""
  full = lora.join(trainable, frozen)
  if not spec.rank:
    return full
  merge = functools.partial(lora.merge_params, scale=spec.scale)
  if not all(isinstance(x, jax.Array) for x in jax.tree.leaves(full)):
    return merge(full)  # host arrays (tests, tools): merged on the default device
  out_sh = lora.without_adapters(jax.tree.map(lambda x: x.sharding, full))
  return jax.jit(merge, out_shardings=out_sh)(full)


def with_lora(model: nnx.Module, spec: lora.LoraConfig, seed: int) -> nnx.Module:
  """`model` with fresh adapters attached to its trunk (in place; rank 0 leaves it as it is)."""
  lora.attach(trunk_of(model), spec, seed)
  return model
