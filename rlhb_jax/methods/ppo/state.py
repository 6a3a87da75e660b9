"""The RLHB train state and its static roles, their shardings, and the one jitted step."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct
from jax.sharding import Mesh

from rlhb_jax.config import Config
from rlhb_jax.infra import sharding
from rlhb_jax.model import lora
from rlhb_jax.model.heads import ScalarModel
from rlhb_jax.model.llama import Transformer
from rlhb_jax.training import optim, trainable

Params = Any


@struct.dataclass
class RLHBState:
  """Every role's trainable parameters (LoRA adapters and heads, or every weight without LoRA)
  with its optimizer state, and in `frozen` the rest of each role (its base weights; {} without
  LoRA). `critic` is {} with `ppo.advantage=group`; `ref` is {} with actor LoRA (the reference
  is then the actor's base with adapters off)."""

  step: jax.Array
  actor: Params
  actor_opt: Any
  critic: Params
  critic_opt: Any
  disc: Params
  disc_opt: Any
  ref: Params
  frozen: dict  # {"actor": ..., "critic": ..., "disc": ...}
  kl_coef: jax.Array
  nonfinite: jax.Array  # updates skipped for a non-finite loss or gradient, in total
  nonfinite_run: jax.Array  # ... in a row (reset by a finite update)
  # Frozen reward model (RLHF) or behavior classifier (RLHBC) for reward.source != "disc"; else {}.
  rm: Params = struct.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Roles:
  """Static halves of the roles: graph definitions and optimizers (closed over by jit)."""

  actor: Any  # nnx.GraphDef of Transformer
  critic: Any  # nnx.GraphDef of ScalarModel(M=1); None with ppo.advantage=group
  disc: Any  # nnx.GraphDef of ScalarModel(M=1)
  actor_tx: optax.GradientTransformation
  critic_tx: optax.GradientTransformation
  disc_tx: optax.GradientTransformation
  eos_ids: tuple[int, ...]
  pad_id: int
  rm: Any = None  # nnx.GraphDef of the reward model (M=1) or behavior classifier (M=K*N)
  # RLHBC: expected count per impression of every (behavior type, bin), float (K, N), and the
  # formula's numerator / denominator weights per type, (K,) each.
  bin_counts: Any = None
  reward_num: Any = None
  reward_den: Any = None
  # reward.source="sim": host function (tokens (B, Tn), mask (B, Tn), query_index (B,)) -> (B,)
  # float32 rewards from the simulated users' ground truth, called through jax.pure_callback.
  oracle: Any = None


def full(state: RLHBState, role: str) -> Params:
  """A role's whole params tree: its trainable half joined with its frozen half."""
  return lora.join(getattr(state, role), state.frozen[role])


def init_state(
  cfg: Config,
  actor: Transformer,
  critic: ScalarModel | None,
  disc: ScalarModel,
  eos_ids: tuple[int, ...],
  pad_id: int,
  mesh: Mesh | None = None,
  rm: ScalarModel | None = None,
  classifier: dict | None = None,
  oracle=None,
  lora_specs: bool = False,
) -> tuple[Roles, RLHBState, RLHBState]:
  """Roles (static), the initial RLHB state and its NamedShardings on `mesh` (default: the
  config's), every role through `trainable.prepare`.

  With `lora_specs` the config's adapters are attached here (actor `cfg.lora`, critic the same
  shape, D `cfg.disc.lora`); otherwise the modules come with theirs. Modules with adapters train
  only those (and their heads); the reference is then the actor's base with adapters off, else a
  frozen copy of the actor. `critic` is None without a critic (`ppo.advantage=group`). `rm` is
  the frozen reward model or behavior classifier the reward reads; `classifier` (RLHBC) holds
  numpy `bin_counts` (K, N), `num` (K,) and `den` (K,).
  """
  classifier = classifier or {}
  mesh = mesh if mesh is not None else sharding.make_mesh(cfg.mesh)
  rules = cfg.mesh.rules
  total = cfg.rlhb.steps * cfg.ppo.epochs * cfg.ppo.minibatches
  txs = {
    "actor": optim.make_optimizer(cfg.ppo.actor_optim, total),
    "critic": optim.make_optimizer(cfg.ppo.critic_optim, total),
    "disc": optim.make_optimizer(cfg.disc.optim, cfg.rlhb.steps * cfg.disc.updates_per_step),
  }
  specs = {"actor": cfg.lora, "critic": cfg.lora, "disc": cfg.disc.lora}
  seeds = {"actor": cfg.seed, "critic": cfg.seed + 1, "disc": cfg.seed + 2}
  models = {"actor": actor, "critic": critic, "disc": disc}
  p = {
    k: trainable.prepare(m, specs[k] if lora_specs else None, seeds[k], mesh, rules, txs[k])
    for k, m in models.items()
  }
  frozen_rm = trainable.prepare(rm, None, 0, mesh, rules, optax.identity())
  roles = Roles(
    actor=p["actor"].graphdef,
    critic=p["critic"].graphdef,
    disc=p["disc"].graphdef,
    actor_tx=txs["actor"],
    critic_tx=txs["critic"],
    disc_tx=txs["disc"],
    eos_ids=tuple(eos_ids),
    pad_id=pad_id,
    rm=frozen_rm.graphdef,
    bin_counts=classifier.get("bin_counts"),
    reward_num=classifier.get("num"),
    reward_den=classifier.get("den"),
    oracle=oracle,
  )
  lora_actor = bool(p["actor"].frozen)

  def trees(suffix: str) -> dict:
    """The trainable roles' fields of the state (suffix "") or of its shardings ("_sh")."""
    out = {"frozen": {k: getattr(p[k], "frozen" + suffix) for k in models}}
    for k in models:
      out[k] = getattr(p[k], "params" + suffix)
      out[f"{k}_opt"] = getattr(p[k], "opt" + suffix)
    out["rm"] = getattr(frozen_rm, "params" + suffix)
    return out

  def zero():  # one buffer per leaf: the step donates the state
    return jnp.zeros((), jnp.int32)

  state = RLHBState(
    **trees(""),
    step=zero(),
    ref={} if lora_actor else jax.tree.map(jnp.copy, p["actor"].params),
    kl_coef=jnp.asarray(cfg.ppo.kl_coef, jnp.float32),
    nonfinite=zero(),
    nonfinite_run=zero(),
  )
  rep = sharding.replicated(mesh)
  state_sh = RLHBState(
    **trees("_sh"),
    step=rep,
    ref={} if lora_actor else p["actor"].params_sh,
    kl_coef=rep,
    nonfinite=rep,
    nonfinite_run=rep,
  )
  return roles, state, state_sh
