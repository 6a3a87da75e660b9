"""RLHF's Bradley-Terry reward model on pairwise preferences: loss, batches, step, held-out
accuracy and the stage.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rlhb_jax.config import Config
from rlhb_jax.data import preferences
from rlhb_jax.data.batches import Encoder, epoch_indices, left_pad, right_pad
from rlhb_jax.data.preferences import Pair
from rlhb_jax.methods import disc as disc_lib
from rlhb_jax.model import build as build_lib
from rlhb_jax.run import Run
from rlhb_jax.training import optim, trainable
from rlhb_jax.training.losses import Array, Metrics, to_f32
from rlhb_jax.training.trainable import SupervisedState, train_model

log = logging.getLogger(__name__)


def bradley_terry_loss(chosen_scores: Array, rejected_scores: Array) -> tuple[Array, Metrics]:
  """Pairwise reward-model loss, mean over (B,) pairs: -log sigmoid(s_chosen - s_rejected).

  Metrics: accuracy (fraction with s_chosen > s_rejected), margin (mean s_chosen - s_rejected).
  """
  margin = to_f32(chosen_scores) - to_f32(rejected_scores)
  loss = jnp.mean(-jax.nn.log_sigmoid(margin))
  margin = jax.lax.stop_gradient(margin)
  return loss, {"accuracy": jnp.mean(margin > 0), "margin": jnp.mean(margin)}


class PairBatcher:
  """Fixed-shape (prefix, chosen, rejected) batches; batch(step) is a pure function of the step."""

  def __init__(self, cfg: Config, tokenizer, pairs: Sequence[Pair], prefix_len: int, size: int):
    self.cfg, self.enc, self.pairs = cfg, Encoder(cfg, tokenizer), list(pairs)
    self.pad, self.Pd, self.size = tokenizer.pad_id, prefix_len, size

  def rows(self, pairs: Sequence[Pair]) -> dict[str, np.ndarray]:
    Tn = self.cfg.sampling.max_new_tokens
    prefix = left_pad([self.enc.prefix(p.query, "", p.context) for p in pairs], self.Pd, self.pad)
    chosen = right_pad([self.enc.response(p.chosen) for p in pairs], Tn, self.pad)
    rejected = right_pad([self.enc.response(p.rejected) for p in pairs], Tn, self.pad)
    return {
      "prefix": prefix[0],
      "prefix_mask": prefix[1],
      "chosen": chosen[0],
      "chosen_mask": chosen[1],
      "rejected": rejected[0],
      "rejected_mask": rejected[1],
    }

  def __call__(self, step: int) -> dict[str, np.ndarray]:
    idx = epoch_indices(self.cfg.seed, step, self.size, len(self.pairs), 43)
    return self.rows([self.pairs[i] for i in idx])


def rm_scores(graphdef, params, batch: dict) -> tuple[jax.Array, jax.Array]:
  chosen = disc_lib.score(
    graphdef, params, batch["prefix"], batch["prefix_mask"], batch["chosen"], batch["chosen_mask"]
  )
  rejected = disc_lib.score(
    graphdef,
    params,
    batch["prefix"],
    batch["prefix_mask"],
    batch["rejected"],
    batch["rejected_mask"],
  )
  return chosen, rejected


def rm_step(graphdef, tx, state: SupervisedState, batch: dict, rng=None):
  """One Bradley-Terry step: -log sigmoid(r(chosen) - r(rejected)); skipped if non-finite."""
  del rng

  def loss_fn(params):
    return bradley_terry_loss(*rm_scores(graphdef, state.full(params), batch))

  (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  return trainable.apply_grads(tx, state, loss, metrics, grads)


def compile_rm(graphdef, tx, shardings=None):
  return trainable.jit_step(functools.partial(rm_step, graphdef, tx), shardings)


@functools.partial(jax.jit, static_argnums=0)
def _rm_correct(graphdef, params, batch):
  chosen, rejected = rm_scores(graphdef, params, batch)
  return chosen > rejected


def rm_accuracy(graphdef, params, batcher: PairBatcher, pairs: Sequence[Pair]) -> float:
  """Share of `pairs` where the reward model scores the chosen response higher."""
  correct = []
  for start in range(0, len(pairs), batcher.size):
    chunk = list(pairs[start : start + batcher.size])
    n = len(chunk)
    chunk += [chunk[0]] * (batcher.size - n)  # fixed shape
    correct += np.asarray(_rm_correct(graphdef, params, batcher.rows(chunk)))[:n].tolist()
  return float(np.mean(correct)) if correct else float("nan")


def train_scorer(run: Run, name: str, model, optim_cfg, steps: int, compile_fn, batcher):
  """Trains a frozen reward's scorer (RLHF's reward model, RLHBC's behavior classifier) with
  `reward.lora` adapters and its own optimizer; returns (graphdef, merged params)."""
  tx = optim.make_optimizer(optim_cfg, steps)
  lora = run.cfg.reward.lora
  return train_model(run, name, model, lora, tx, compile_fn, batcher, steps, ("loss", "accuracy"))


def reward_model(run: Run) -> None:
  """RLHF's Bradley-Terry reward model on pairwise preferences (held-out accuracy reported)."""
  cfg = run.cfg
  if run.has_params("reward_model") or cfg.reward.rm_steps <= 0:
    return
  actor = run.actor_model(prefer=("sft_actor",))
  rm = build_lib.build_disc(cfg, actor, run.tokenizer.vocab_size, seed_offset=3)
  train_pairs, heldout = preferences.split_heldout(
    run.read_preferences(), cfg.reward.rm_heldout_fraction, cfg.seed
  )
  batcher = PairBatcher(cfg, run.tokenizer, train_pairs, run.batcher.Pd, cfg.reward.rm_batch_size)
  graphdef, params = train_scorer(
    run, "reward_model", rm, cfg.reward.rm_optim, cfg.reward.rm_steps, compile_rm, batcher
  )
  report = {
    "heldout_accuracy": rm_accuracy(graphdef, params, batcher, heldout),
    "train_pairs": len(train_pairs),
    "heldout_pairs": len(heldout),
  }
  run.save_params("reward_model", params)
  run.save_report("reward_model", report)
  log.info("reward model: held-out pairwise accuracy %.3f", report["heldout_accuracy"])


def frozen_reward_model(run: Run, cfg: Config, actor) -> tuple[Any, None]:
  """The trained reward model of the run, for a PPO reward that reads it."""
  rm = build_lib.build_disc(cfg, actor, run.tokenizer.vocab_size, seed_offset=3)
  params = run.load_params("reward_model", rm)
  if params is None:
    raise FileNotFoundError(f"{run.workdir}/models/reward_model: run mode=reward_model first")
  nnx.update(rm, params)
  return rm, None
