"""PPO stages: RLHB (the discriminator's reward) and the baselines that share its loop: RLHF (a
reward model), RLHBC (the behavior classifier), RLHF + RLHB, and the simulator's own reward.
"""

from __future__ import annotations

import logging
from typing import Any, NamedTuple

import jax
import numpy as np
from flax import nnx

from rlhb_jax import config as config_lib
from rlhb_jax.config import Config
from rlhb_jax.data.batches import Batcher
from rlhb_jax.eval import evaluate
from rlhb_jax.infra import sharding
from rlhb_jax.methods.classifier import behavior_classifier
from rlhb_jax.methods.disc import disc_warmup
from rlhb_jax.methods.ppo import advantages, rewards
from rlhb_jax.methods.ppo import state as ppo_state
from rlhb_jax.methods.ppo import step as ppo_step
from rlhb_jax.methods.reward_model import reward_model
from rlhb_jax.model import build as build_lib
from rlhb_jax.run import Run
from rlhb_jax.training import loop, trainable
from rlhb_jax.training.trainable import _meta

log = logging.getLogger(__name__)


def ppo_config(cfg: Config, source: str) -> Config:
  """The config of a PPO stage whose reward comes from `source`: D is not trained without it, and
  has no lead to take (`lead_steps`)."""
  changes = {"reward.source": source}
  if not rewards.uses_disc(config_lib.replace(cfg, **changes)):
    changes["disc.updates_per_step"] = 0
  return config_lib.replace(cfg, **changes)


def lead_steps(cfg: Config) -> int:
  """How many first steps of a PPO stage under `cfg` are D-only (`ppo_step.lead_step`): the
  actor waits while D learns its answers."""
  if rewards.uses_disc(cfg) and cfg.disc.updates_per_step > 0:
    return cfg.rlhb.disc_lead_steps
  return 0


class PPOSetup(NamedTuple):
  state: Any  # RLHBState, placed on the mesh
  step: Any  # the jitted train step (state, batch, rng) -> (state, metrics)
  lead: Any  # the jitted D-only lead step, same signature
  mesh: Any
  roles: Any  # the static roles (graph definitions, optimizers)


def _reward_roles(run: Run, cfg: Config, actor) -> tuple[Any, dict | None]:
  """The frozen reward model or behavior classifier the PPO reward of `cfg` reads, if any."""
  load = rewards.get(cfg.reward.source).frozen
  return load(run, cfg, actor) if load is not None else (None, None)


class SimOracle:
  """reward.source=sim: the host function that scores rollouts with the simulated users' expected
  like rate of `queries[index]` (responses decoded exactly as evaluation decodes them), under the
  users of `round` (None: the users before any drift). `mode=online` sets both every round."""

  def __init__(self, run: Run, queries: list[str], round: int | None = None):
    self.tok, self.sim = run.tokenizer, run.simulator
    self.eos = set(self.tok.eos_ids)
    self.queries, self.round = list(queries), round

  def __call__(self, tokens, mask, index) -> np.ndarray:
    out = np.zeros(len(index), np.float32)
    for i, (row, live, q) in enumerate(zip(tokens, mask, index, strict=True)):
      ids = [int(t) for t, m in zip(row, live, strict=True) if m and int(t) not in self.eos]
      text = self.tok.decode(ids)
      out[i] = self.sim.expected_rates(self.queries[int(q)], text, self.round)["like"]
    return out


def setup_rlhb(
  run: Run,
  example_batch: dict,
  cfg: Config | None = None,
  start: tuple[str, ...] = ("sft_actor",),
  oracle=None,
) -> PPOSetup:
  """The PPO train state (generator from `start`, the warmed-up D, the frozen reward model when
  `cfg.reward.source` needs one), placed on the mesh, and the jitted step and lead step for
  batches shaped like `example_batch` (each compiles at its first call)."""
  cfg = cfg or run.cfg
  actor = run.actor_model(prefer=start)
  critic = None
  if advantages.get(cfg.ppo.advantage).critic:
    critic = build_lib.scalar_from_lm(actor, 1, cfg.seed + 1)
  disc = build_lib.build_disc(cfg, actor, run.tokenizer.vocab_size)
  warm = run.load_params("disc_warmup", disc)
  if warm is not None:
    nnx.update(disc, warm)
  rm, classifier = _reward_roles(run, cfg, actor)
  tok = run.tokenizer
  mesh = sharding.make_mesh(cfg.mesh)
  rl_roles, state, state_sh = ppo_state.init_state(
    cfg,
    actor,
    critic,
    disc,
    tok.eos_ids,
    tok.pad_id,
    mesh,
    rm=rm,
    classifier=classifier,
    oracle=oracle,
    lora_specs=True,
  )
  batch_sh = trainable.batch_shardings(example_batch, mesh)
  with jax.set_mesh(mesh):
    state = sharding.place(state, state_sh)
  step_fn = ppo_step.compile_train_step(rl_roles, cfg, state_sh, batch_sh, mesh)
  lead = ppo_step.compile_train_step(rl_roles, cfg, state_sh, batch_sh, mesh, ppo_step.lead_step)
  return PPOSetup(state, step_fn, lead, mesh, rl_roles)


def ppo(run: Run, name: str, source: str, start: tuple[str, ...]) -> None:
  """A PPO stage named `name` (rlhb, rlhf, rlhbc, rlhf_rlhb) with the reward from `source`,
  starting from the generator `start`; writes models/<name>_actor."""
  if run.has_params(f"{name}_actor"):
    return
  cfg = ppo_config(run.cfg, source)
  reward = rewards.get(cfg.reward.source)
  batcher = run.batcher
  if reward.batch_fields:  # its prefixes or query indices come with the batches
    batcher = Batcher(
      cfg, run.tokenizer, run.examples, run.best_behavior, batcher.worst, extras=reward.batch_fields
    )
  oracle = SimOracle(run, batcher.queries) if reward.single_process else None
  example = batcher.rlhb(0)
  state, step_fn, lead, mesh, _ = setup_rlhb(run, example, cfg, start, oracle)
  rows = cfg.ppo.prompts_per_step * cfg.ppo.rollouts_per_prompt
  show = ("reward_mean", *reward.show, "kl", "tokens_per_s")
  with jax.set_mesh(mesh):
    state = loop.train_loop(
      name=name,
      workdir=run.workdir,
      cfg=cfg,
      step_fn=step_fn,
      lead=(lead_steps(cfg), lead),
      state=state,
      batch_fn=batcher.rlhb,
      num_steps=cfg.rlhb.steps,
      rng=sharding.place(jax.random.key(cfg.seed), sharding.replicated(mesh)),
      meta=_meta(run, name),
      monitor=loop.rlhb_monitor(cfg),
      rows_per_step=rows,
      show=show,
      hook=evaluate.curve_hook(run) if cfg.eval.curve_every > 0 else None,
      hook_every=cfg.eval.curve_every,
      batch_shardings=trainable.batch_shardings(example, mesh),
    )
  run.save_params(
    f"{name}_actor", build_lib.merged_params(state.actor, state.frozen["actor"], cfg.lora)
  )
  if rewards.uses_disc(cfg):
    run.save_params(
      f"{name}_disc", build_lib.merged_params(state.disc, state.frozen["disc"], cfg.disc.lora)
    )
  log.info(
    "%s done: %d steps, %d non-finite updates skipped",
    name,
    int(state.step),
    int(state.nonfinite),
  )


def rlhb(run: Run) -> None:
  """The adversarial loop: PPO on the discriminator's reward, D trained on real vs. fake."""
  ppo(run, "rlhb", run.cfg.reward.source, ("sft_actor",))


def rlhf(run: Run) -> None:
  reward_model(run)
  ppo(run, "rlhf", "rm", ("sft_actor",))


def rlhbc(run: Run) -> None:
  behavior_classifier(run)
  ppo(run, "rlhbc", "classifier", ("sft_actor",))


def rlhf_rlhb(run: Run) -> None:
  """The paper's Q2: RLHB continued from the RLHF policy (reward.source=disc+rm adds the RM)."""
  rlhf(run)
  disc_warmup(run)
  source = run.cfg.reward.source if rewards.uses_disc(run.cfg) else "disc"
  ppo(run, "rlhf_rlhb", source, ("rlhf_actor", "sft_actor"))
