"""A model in training: the supervised state, its shardings, and the resumable supervised stage
(load, attach adapters, split, shard, optimise, merge).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct
from jax.sharding import Mesh

from rlhb_jax import config as config_lib
from rlhb_jax.infra import sharding
from rlhb_jax.model import build as build_lib
from rlhb_jax.model import lora
from rlhb_jax.run import Run
from rlhb_jax.training import loop, optim


@struct.dataclass
class SupervisedState:
  """One model in training: its trainable params (all, or LoRA adapters and head) and optimizer
  state; `frozen` holds the rest of the model ({} without LoRA). `ref` is the offline preference
  steps' frozen reference when it is not the base with adapters off: a copy of the starting params
  without LoRA, or a given model (a full tree, adapters at zero under LoRA); {} otherwise."""

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


def apply_grads(tx, state: SupervisedState, loss, metrics: dict, grads):
  """One optimizer update of a supervised state (the optimizer skips it when the gradients are
  not finite). Adds loss and grad_norm to the metrics."""
  updates, opt = tx.update(grads, state.opt, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics = {**metrics, "loss": loss, "grad_norm": optax.global_norm(grads)}
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


@dataclasses.dataclass(frozen=True)
class Prepared:
  """A model ready to train: its graph (with adapters), its params split into the trainable half
  (adapters and heads under LoRA, else every weight) and the frozen rest, the optimizer state of
  the trainable half, and NamedShardings of all three from the parameters' logical axes."""

  graphdef: Any
  params: Any
  frozen: Any
  opt: Any
  params_sh: Any
  frozen_sh: Any
  opt_sh: Any


def prepare(
  model: nnx.Module | None,
  spec: lora.LoraConfig | None,
  seed: int,
  mesh: Mesh,
  rules,
  tx: optax.GradientTransformation,
) -> Prepared:
  """The one way a model becomes trainable, for every stage and the online loop: attaches
  `spec`'s adapters to `model` in place (rank 0 trains every weight; None keeps the model as it
  is), splits its params, builds the optimizer state, and lays everything out on `mesh` by the
  rules table. A missing role (`model` None, e.g. no critic) is empty trees."""
  if model is None:
    opt = tx.init({})
    return Prepared(None, {}, {}, opt, {}, {}, opt_shardings(tx, opt, {}, mesh))
  if spec is not None:
    build_lib.with_lora(model, spec, seed)
  params, frozen = build_lib.split_params(model)
  full_sh = sharding.param_shardings(
    build_lib.params_of(model), sharding.logical_axes(model), mesh, rules
  )
  params_sh, frozen_sh = lora.split(full_sh, build_lib.has_lora(model))
  opt = tx.init(params)
  opt_sh = opt_shardings(tx, opt, params_sh, mesh)
  return Prepared(nnx.graphdef(model), params, frozen, opt, params_sh, frozen_sh, opt_sh)


def opt_shardings(tx, opt_state, param_sh, mesh: Mesh):
  return optax.tree_map_params(
    tx,
    lambda _, s: s,
    opt_state,
    param_sh,
    transform_non_params=lambda _: sharding.replicated(mesh),
  )


def supervised(
  p: Prepared, reference: bool = False, ref_params: Any = None
) -> tuple[SupervisedState, SupervisedState]:
  """A supervised state of `p` and its shardings. `reference` keeps a frozen copy of the starting
  weights when there are no adapters (the offline preference stages' reference); `ref_params`, a
  plain model's params, is the reference instead, with or without adapters (under LoRA it gets
  `p`'s fresh adapters, which compute nothing: B = 0)."""
  ref, ref_sh = {}, {}
  if ref_params is not None:
    ref = lora.join(p.params, ref_params) if p.frozen else ref_params
    ref_sh = lora.join(p.params_sh, p.frozen_sh) if p.frozen else p.params_sh
  elif reference and not p.frozen:
    ref, ref_sh = p.params, p.params_sh
  ref = jax.tree.map(jnp.copy, ref)  # the step donates the state: no buffer shared with params
  state = SupervisedState(jnp.zeros((), jnp.int32), p.params, p.opt, p.frozen, ref)
  rep = sharding.replicated(jax.tree.leaves(p.params_sh)[0].mesh)
  state_sh = SupervisedState(rep, p.params_sh, p.opt_sh, p.frozen_sh, ref_sh)
  return state, state_sh


def batch_shardings(batch: dict, mesh: Mesh) -> dict:
  return {k: sharding.batch_sharding(mesh, v.ndim, v.shape[0]) for k, v in batch.items()}


def _meta(run: Run, stage: str) -> dict:
  edges = run.workdir / "bin_edges.json"
  return {
    "stage": stage,
    "seed": run.cfg.seed,
    "data_position": "the step (batches are a pure function of seed and step)",
    "bin_edges": edges.read_text() if edges.exists() else None,
    "tokenizer_dir": str(run.workdir / "tokenizer"),
    "config": config_lib.to_configdict(run.cfg).to_json(),
  }


def train_model(
  run: Run,
  name: str,
  model,
  spec,
  tx,
  compile_fn,
  batch_fn,
  num_steps,
  show,
  reference=False,
  ref_params=None,
):
  """A supervised stage: attaches `spec`'s adapters to `model` (rank 0: trains every weight),
  runs the resumable loop on the mesh (the batch split over its data axes, the parameters placed
  by the rules table) and returns (graphdef, params) of the plain model with the adapters merged
  in, ready to save under models/<name>. `reference` keeps a frozen copy of the starting weights
  in the state when there are no adapters (the offline preference stages' reference);
  `ref_params` (a plain model's params) is the reference instead (`supervised`)."""
  cfg = run.cfg
  plain = nnx.graphdef(model)
  mesh = sharding.make_mesh(cfg.mesh)
  p = prepare(model, spec, cfg.seed, mesh, cfg.mesh.rules, tx)
  state, state_sh = supervised(p, reference, ref_params)
  rep = sharding.replicated(mesh)
  batch_sh = batch_shardings(batch_fn(0), mesh)
  with jax.set_mesh(mesh):
    state = sharding.place(state, state_sh)
    state = loop.train_loop(
      name=name,
      workdir=run.workdir,
      cfg=cfg,
      step_fn=compile_fn(p.graphdef, tx, (state_sh, batch_sh, rep)),
      state=state,
      batch_fn=batch_fn,
      num_steps=num_steps,
      rng=sharding.place(jax.random.key(cfg.seed), rep),
      meta=_meta(run, name),
      show=show,
      batch_shardings=batch_sh,
    )
  return plain, build_lib.merged_params(state.params, state.frozen, spec)


def start_params(run: Run, plain_model) -> Any:
  """The offline stages' reference for held-out checks: the SFT generator (or the base one)."""
  params = run.load_params("sft_actor", plain_model)
  return params if params is not None else build_lib.params_of(run.base_actor())


def train_from_sft(
  run: Run, name: str, optim_cfg, steps: int, compile_fn, batcher, show, init_params=None
):
  """An offline stage on the generator (DPO, KTO): `lora` adapters on the SFT generator, trained
  against it as the frozen reference. `init_params` (a plain generator's params, e.g. an earlier
  result of the stage) are the weights to train instead, the adapters on them under LoRA, the
  reference still the SFT generator. Returns (graphdef, merged params, the reference's params)."""
  tx = optim.make_optimizer(optim_cfg, steps)
  model = run.actor_model(prefer=("sft_actor",))
  ref = None
  if init_params is not None:
    ref = build_lib.params_of(model)
    nnx.update(model, jax.tree.map(jnp.copy, init_params))  # the step donates what it trains
  graphdef, params = train_model(
    run, name, model, run.cfg.lora, tx, compile_fn, batcher, steps, show, True, ref
  )
  return graphdef, params, start_params(run, params)
