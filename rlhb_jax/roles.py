"""Building the roles (generator, critic, reference, discriminator) and the sharded RLHB state."""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh

from rlhb_jax import sharding, steps, supervised
from rlhb_jax.config import Config, ModelSpec
from rlhb_jax.model import lora
from rlhb_jax.model.heads import ScalarModel
from rlhb_jax.model.llama import LlamaConfig, Transformer


def tiny_llama_config(spec: ModelSpec, vocab_size: int) -> LlamaConfig:
  return LlamaConfig(
    vocab_size=vocab_size,
    embed_dim=spec.embed_dim,
    num_layers=spec.num_layers,
    num_heads=spec.num_heads,
    num_kv_heads=spec.num_kv_heads,
    head_dim=spec.head_dim,
    mlp_dim=spec.mlp_dim,
    rope_theta=spec.rope_theta,
    tie_embeddings=spec.tie_embeddings,
    dtype=spec.dtype,
    param_dtype=spec.param_dtype,
    remat=spec.remat,
  )


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
  """A role's params on the host with its adapters (of `spec`) folded into the base: the tree of
  the plain model, as `models/<name>` stores it."""
  full = lora.join(sharding.to_host(trainable), sharding.to_host(frozen))
  return lora.merge_params(full, spec.scale) if spec.rank else full


def with_lora(model: nnx.Module, spec: lora.LoraConfig, seed: int) -> nnx.Module:
  """`model` with fresh adapters attached to its trunk (in place; rank 0 leaves it as it is)."""
  lora.attach(trunk_of(model), spec, seed)
  return model


def init_state(
  cfg: Config,
  actor: Transformer,
  critic: ScalarModel,
  disc: ScalarModel,
  eos_ids: tuple[int, ...],
  pad_id: int,
  disc_opt_state: Any = None,
  rm: ScalarModel | None = None,
  classifier: dict | None = None,
  oracle=None,
) -> tuple[steps.Roles, steps.RLHBState]:
  """Roles (static) and the initial RLHB state.

  Modules with LoRA adapters attached (`with_lora`) train only those (and their heads); the
  reference is then the actor's base with adapters off, else a frozen copy of the actor. `critic`
  is None with `ppo.advantage=group`. `rm` is the frozen reward model or behavior classifier of
  `cfg.reward.source` != "disc"; `classifier` (RLHBC) holds numpy `bin_counts` (K, N), `num`
  (K,) and `den` (K,).
  """
  classifier = classifier or {}
  total = cfg.rlhb.steps * cfg.ppo.epochs * cfg.ppo.minibatches
  roles = steps.Roles(
    actor=nnx.graphdef(actor),
    critic=nnx.graphdef(critic) if critic is not None else None,
    disc=nnx.graphdef(disc),
    actor_tx=steps.make_optimizer(cfg.ppo.actor_optim, total),
    critic_tx=steps.make_optimizer(cfg.ppo.critic_optim, total),
    disc_tx=steps.make_optimizer(cfg.disc.optim, cfg.rlhb.steps * cfg.disc.updates_per_step),
    eos_ids=tuple(eos_ids),
    pad_id=pad_id,
    rm=nnx.graphdef(rm) if rm is not None else None,
    bin_counts=classifier.get("bin_counts"),
    reward_num=classifier.get("num"),
    reward_den=classifier.get("den"),
    oracle=oracle,
  )
  (a, a_frozen), (c, c_frozen), (d, d_frozen) = map(split_params, (actor, critic, disc))
  state = steps.RLHBState(
    step=jnp.zeros((), jnp.int32),
    actor=a,
    actor_opt=roles.actor_tx.init(a),
    critic=c,
    critic_opt=roles.critic_tx.init(c),
    disc=d,
    disc_opt=roles.disc_tx.init(d),
    ref={} if has_lora(actor) else jax.tree.map(jnp.copy, a),
    frozen={"actor": a_frozen, "critic": c_frozen, "disc": d_frozen},
    kl_coef=jnp.asarray(cfg.ppo.kl_coef, jnp.float32),
    nonfinite=jnp.zeros((), jnp.int32),
    nonfinite_run=jnp.zeros((), jnp.int32),
    rm=params_of(rm) if rm is not None else {},
  )
  return roles, state


def opt_shardings(tx, opt_state, param_sh, mesh: Mesh):
  return optax.tree_map_params(
    tx,
    lambda _, s: s,
    opt_state,
    param_sh,
    transform_non_params=lambda _: sharding.replicated(mesh),
  )


def supervised_shardings(
  state: supervised.SupervisedState, tx, params_sh, frozen_sh, mesh: Mesh
) -> supervised.SupervisedState:
  """NamedShardings of a supervised state whose trainable params (and reference copy) are laid
  out as `params_sh` and its frozen base as `frozen_sh`."""
  rep = sharding.replicated(mesh)
  return supervised.SupervisedState(
    step=rep,
    params=params_sh,
    opt=opt_shardings(tx, state.opt, params_sh, mesh),
    frozen=frozen_sh if state.frozen else {},
    ref=params_sh if state.ref else {},
  )


def state_shardings(
  roles: steps.Roles, state: steps.RLHBState, models: dict[str, nnx.Module], mesh: Mesh, rules
) -> steps.RLHBState:
  """NamedShardings for every leaf of the RLHB state, from the parameters' logical axes."""
  ps, frozen = {}, {}
  for name, m in models.items():
    if m is None:
      ps[name], frozen[name] = {}, {}
      continue
    full = sharding.param_shardings(params_of(m), sharding.logical_axes(m), mesh, rules)
    ps[name], frozen[name] = lora.split(full, has_lora(m))
  rep = sharding.replicated(mesh)
  return steps.RLHBState(
    step=rep,
    actor=ps["actor"],
    actor_opt=opt_shardings(roles.actor_tx, state.actor_opt, ps["actor"], mesh),
    critic=ps["critic"],
    critic_opt=opt_shardings(roles.critic_tx, state.critic_opt, ps["critic"], mesh),
    disc=ps["disc"],
    disc_opt=opt_shardings(roles.disc_tx, state.disc_opt, ps["disc"], mesh),
    ref={} if not state.ref else ps["actor"],
    frozen={k: frozen.get(k, {}) for k in ("actor", "critic", "disc")},
    kl_coef=rep,
    nonfinite=rep,
    nonfinite_run=rep,
    rm=ps.get("rm", {}),
  )


def batch_shardings(batch: dict, mesh: Mesh) -> dict:
  return {k: sharding.batch_sharding(mesh, v.ndim, v.shape[0]) for k, v in batch.items()}


def compile_train_step(roles: steps.Roles, cfg: Config, state_sh, batch_sh, mesh: Mesh):
  """The one jitted RLHB step, with shardings and the state donated."""
  rep = sharding.replicated(mesh)
  return jax.jit(
    functools.partial(steps.train_step, roles, cfg),
    in_shardings=(state_sh, batch_sh, rep),
    out_shardings=(state_sh, rep),
    donate_argnums=(0,),
  )
