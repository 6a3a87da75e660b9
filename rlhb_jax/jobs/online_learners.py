"""What a round of `mode=online` trains on the records users produced (`online.learner`).

A learner holds the generator between rounds. `train(r, rounds, log_step)` gets the records of
rounds 0..r (the last one fresh from the store) and returns what to add to the round's entry;
`generator()` is the plain generator to deploy and publish (LoRA adapters merged); `step` is the
model step the server reports with every answer; `tree()` / `load(tree)` are what the round's
checkpoint holds.

- `RLHBLearner` ("rlhb"): `online.sft_steps` behavior-conditioned SFT steps, then
  `online.steps_per_round` PPO steps on the reward of `reward.source`, on the records of the last
  `online.window_rounds` rounds. With the discriminator (`disc`), D learns from the fresh real
  triplets; with `sim` (simulated users only; experiments/online_real_model.py's ceiling), the
  reward is the simulated users' expected like rate under that round's users.
- `KTOLearner` ("kto"): after round r, KTO (`methods/kto.py`) on every round's records so far,
  each marked desirable or undesirable by its behavior bins, against the SFT generator as the
  reference. `online.kto_refit` says where it starts: "scratch" refits from the SFT generator for
  (r + 1) x `kto.steps` steps; "continue" trains the deployed KTO generator (round 0: the SFT
  one) `kto.steps` steps further, with fresh adapters under LoRA and fresh optimizer state, the
  warm-up of `kto.optim` in the first refit only. Either way the deployed model has seen as many
  answers as one that trained `kto.steps` x `kto.batch_size` answers a round; "continue" costs the
  same each round. A round whose records hold no desirable or no undesirable answer keeps the
  deployed model (and "continue"'s next refit makes up its steps).
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from rlhb_jax import config as config_lib
from rlhb_jax.data.batches import Batcher, Example, record_context
from rlhb_jax.data.behavior import least_preferred_text, verbalize_records
from rlhb_jax.infra import sharding
from rlhb_jax.methods import kto as kto_lib
from rlhb_jax.methods import sft as sft_lib
from rlhb_jax.methods.ppo import rewards
from rlhb_jax.methods.ppo import stages as ppo_stages
from rlhb_jax.model import build as build_lib
from rlhb_jax.run import Run
from rlhb_jax.training import optim, trainable

log = logging.getLogger(__name__)

LogStep = Callable[[int, dict, int], None]  # (step, metrics, round)


def round_examples(run: Run, records: list[dict]) -> list[Example]:
  """Records read from the store as training examples: behavior text from the run's bin edges,
  the search result each answer was shown with."""
  texts = verbalize_records(records, run.binner)
  return [
    Example(r["query"], r["response"], t, record_context(r))
    for r, t in zip(records, texts, strict=True)
  ]


class RLHBLearner:
  """online.learner=rlhb (see the module docstring)."""

  def __init__(self, run: Run):
    cfg = run.cfg
    reward = rewards.get(cfg.reward.source)
    if not reward.uses_disc:  # D scores nothing: do not train it
      cfg = config_lib.replace(cfg, **{"disc.updates_per_step": 0})
    self.run, self.cfg, self.extras = run, cfg, reward.batch_fields
    self.worst = least_preferred_text(cfg.behavior)
    # The offline logs fix the padded lengths, so the step compiles once.
    self.base = run.batcher
    if self.extras:  # the oracle's query indices come with the batches
      self.base = Batcher(
        cfg, run.tokenizer, run.examples, run.best_behavior, self.worst, extras=self.extras
      )
    self.oracle = ppo_stages.SimOracle(run, []) if reward.single_process else None
    state, self.step_fn, _, self.mesh, _ = ppo_stages.setup_rlhb(
      run, self.base.rlhb(0), cfg, oracle=self.oracle
    )
    # The round's SFT steps train what PPO trains (all weights, or the adapters on the shared
    # base), on the RLHB step's layout, so the two steps hand the generator to each other as it is.
    ocfg, mesh = cfg.online, self.mesh
    sft_tx = optim.make_optimizer(ocfg.sft_optim, max(ocfg.rounds * ocfg.sft_steps, 1))
    sft = trainable.prepare(run.base_actor(), cfg.lora, cfg.seed, mesh, cfg.mesh.rules, sft_tx)
    sft_state, sft_sh = trainable.supervised(sft)
    sft_state = sft_state.replace(
      params=jax.tree.map(jnp.copy, state.actor), frozen=state.frozen["actor"]
    )
    with jax.set_mesh(mesh):
      sft_state = sharding.place(sft_state, sft_sh)
    batch_sh = trainable.batch_shardings(self.base.sft(0), mesh)
    self.sft_fn = sft_lib.compile_sft(
      sft.graphdef, sft_tx, (sft_sh, batch_sh, sharding.replicated(mesh))
    )
    self.state, self.sft_state = state, sft_state
    self.rng = jax.random.key(cfg.seed)

  @property
  def step(self) -> int:
    return int(self.state.step)

  def tree(self) -> dict:
    return {"rlhb": self.state, "sft": self.sft_state}

  def load(self, tree: dict) -> None:
    self.state, self.sft_state = tree["rlhb"], tree["sft"]

  def generator(self):
    """The plain generator's params on the host (LoRA adapters merged into the base)."""
    merged = build_lib.merged_params(self.state.actor, self.state.frozen["actor"], self.cfg.lora)
    return sharding.to_host(merged)  # a copy: the step donates the state

  def batcher(self, examples: list[Example]) -> Batcher:
    run, lengths = self.run, (self.base.P, self.base.Pd)
    return Batcher(
      self.cfg, run.tokenizer, examples, run.best_behavior, self.worst, lengths, self.extras
    )

  def train(self, r: int, rounds: list[list[dict]], log_step: LogStep) -> dict:
    ocfg, entry = self.cfg.online, {}
    examples = round_examples(self.run, [x for recs in rounds[-ocfg.window_rounds :] for x in recs])
    batcher = self.batcher(examples)
    entry["best_pool"] = len(batcher.best_pool)
    if self.oracle is not None:  # the users of this round score this round's queries
      self.oracle.queries, self.oracle.round = batcher.queries, r
    state, sft_state, rng = self.state, self.sft_state, self.rng
    with jax.set_mesh(self.mesh):
      sft_batcher = batcher
      if ocfg.sft_rows == "best":
        best = [examples[i] for i in batcher.best_pool]
        sft_batcher = self.batcher(best) if best else None
      if ocfg.sft_steps > 0 and sft_batcher is not None:
        sft_state = sft_state.replace(params=state.actor, frozen=state.frozen["actor"])
        s0 = int(sft_state.step)  # host-side step numbers: no sync inside the loops
        for i in range(ocfg.sft_steps):
          sft_state, m = self.sft_fn(sft_state, sft_batcher.sft(s0 + i), rng)
        bases = state.frozen | {"actor": sft_state.frozen}  # the step donated the base
        state = state.replace(actor=sft_state.params, frozen=bases)
        entry["sft_loss"] = float(m["loss"])
      s0, pending = int(state.step), None
      for i in range(ocfg.steps_per_round):
        state, metrics = self.step_fn(state, batcher.rlhb(s0 + i), rng)
        if pending is not None:  # step i-1's metrics, read once step i is dispatched
          log_step(*pending, r)
        pending = (s0 + i + 1, metrics)
      if pending is not None:
        log_step(*pending, r)
    # Its own copies were donated to the step.
    self.sft_state = sft_state.replace(params=state.actor, frozen=state.frozen["actor"])
    self.state = state
    return entry


class KTOLearner:
  """online.learner=kto (see the module docstring)."""

  def __init__(self, run: Run):
    self.run, self.cfg = run, run.cfg
    self.params = build_lib.params_of(run.actor_model(prefer=("sft_actor",)))
    self.steps = np.zeros((), np.int32)  # KTO steps behind the deployed generator, all refits

  @property
  def step(self) -> int:
    return int(self.steps)

  def tree(self) -> dict:
    return {"actor": self.params, "step": self.steps}

  def load(self, tree: dict) -> None:
    self.params, self.steps = tree["actor"], np.asarray(tree["step"], np.int32)

  def generator(self):
    return self.params

  def train(self, r: int, rounds: list[list[dict]], log_step: LogStep) -> dict:
    del log_step  # the refit's loop writes online_kto_RRR.jsonl itself
    run, cfg = self.run, self.cfg
    items, report = kto_lib.kto_examples([x for recs in rounds for x in recs], run.binner, cfg)
    entry = {"kto_desirable": report["desirable"], "kto_undesirable": report["undesirable"]}
    # Either way the deployed model has (r + 1) x kto.steps steps behind it after round r: a
    # continued refit adds the missing ones (kto.steps, unless a round kept its model) at the
    # rate the first refit warmed up to (after make_optimizer's first update, at rate 0).
    init, done = None, 0
    if cfg.online.kto_refit == "continue" and self.steps > 0:
      init, done = self.params, int(self.steps)
    changes = {"kto.steps": max((r + 1) * cfg.kto.steps - done, cfg.kto.steps)}
    if init is not None:
      changes["kto.optim.warmup_steps"] = 0
    try:
      if cfg.kto.balance:
        w_good, w_bad = kto_lib.balanced_weights(items)
        changes |= {"kto.desirable_weight": w_good, "kto.undesirable_weight": w_bad}
      elif not items:
        raise ValueError("no desirable or undesirable answers")
    except ValueError as e:
      log.warning("round %d: KTO keeps the deployed model: %s", r, e)
      return entry | {"kto_steps": 0}
    kcfg = config_lib.replace(cfg, **changes)
    k = kcfg.kto
    name = f"online_kto_{r:03d}"
    checkpoints = run.workdir / "checkpoints" / name
    shutil.rmtree(checkpoints, ignore_errors=True)  # a killed round's refit saw other records
    batcher = kto_lib.LabeledBatcher(kcfg, run.tokenizer, run.best_behavior, items, k.batch_size)
    _, params, _ = trainable.train_from_sft(
      run,
      name,
      k.optim,
      k.steps,
      lambda graphdef, tx, sh: kto_lib.compile_kto(graphdef, tx, kcfg, sh),
      batcher,
      ("loss", "kl"),
      init_params=init,
    )
    shutil.rmtree(checkpoints, ignore_errors=True)  # the round's own checkpoint holds the result
    self.params, self.steps = params, self.steps + k.steps
    return entry | {"kto_steps": k.steps}


LEARNERS = {"rlhb": RLHBLearner, "kto": KTOLearner}


def make_learner(run: Run) -> RLHBLearner | KTOLearner:
  return LEARNERS[run.cfg.online.learner](run)
