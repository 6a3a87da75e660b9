"""The RLHB train step and its phases, all pure functions of pytrees.

`train_step(state, batch, rng) -> (state, metrics)` composes
  rollout -> reward (rewards.py) -> advantages (advantages.py: GAE or group) -> PPO update ->
  discriminator update (methods/disc.py)
and is jitted once with shardings (`compile_train_step`). Each phase is a function of its
own that can be jitted alone for tests and profiling.

Shapes: Bp prompts per step, n rollouts per prompt, B = Bp * n rows, P prompt bucket, Pd
discriminator prefix bucket, Tn new tokens, V vocab.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh

from rlhb_jax.config import Config
from rlhb_jax.infra import sharding
from rlhb_jax.methods.disc import disc_batch, disc_update
from rlhb_jax.methods.ppo import advantages, rewards
from rlhb_jax.methods.ppo.state import RLHBState, Roles, full
from rlhb_jax.model import lora
from rlhb_jax.model.sampling import decodes_as_trained, sample
from rlhb_jax.training import losses
from rlhb_jax.training.forward import critic_values, policy_logits, token_logprobs
from rlhb_jax.training.optim import all_finite

Params = Any


class Rollout(NamedTuple):
  prompt: jax.Array  # (B, P)
  prompt_mask: jax.Array  # (B, P)
  tokens: jax.Array  # (B, Tn)
  mask: jax.Array  # (B, Tn) completion mask
  prefix: jax.Array  # (B, Pd) discriminator prefix of the target behavior
  prefix_mask: jax.Array
  logprobs: jax.Array  # (B, Tn) the sampler's log-probs of its tokens (the PPO "old" policy)


def rollout(roles: Roles, actor: Params, batch: dict, rng: jax.Array, cfg: Config) -> Rollout:
  """n responses per prompt from the generator (`actor`: its full params tree)."""
  n = cfg.ppo.rollouts_per_prompt
  rep = lambda x: jnp.repeat(x, n, axis=0)
  prompt, prompt_mask = rep(batch["prompt"]), rep(batch["prompt_mask"])
  model = nnx.merge(roles.actor, actor)
  out = sample(model, prompt, prompt_mask, rng, cfg.sampling, roles.eos_ids, roles.pad_id)
  return Rollout(
    prompt,
    prompt_mask,
    out.tokens,
    out.mask,
    rep(batch["prefix"]),
    rep(batch["prefix_mask"]),
    out.logprobs,
  )


def _temperature(cfg: Config) -> float:
  return 1.0 if cfg.sampling.greedy else cfg.sampling.temperature


class Experience(NamedTuple):
  """What PPO updates on. With `fused_old_logprobs` the old log-probs, advantages and returns are
  None here: the update's own forward supplies them (`advantages_in_update`)."""

  prompt: jax.Array
  prompt_mask: jax.Array
  tokens: jax.Array
  mask: jax.Array
  old_logprobs: jax.Array | None
  old_values: jax.Array
  advantages: jax.Array | None
  returns: jax.Array | None
  seq_reward: jax.Array  # (B,) the normalized sequence reward
  ref_logprobs: jax.Array  # (B, Tn)


def fused_old_logprobs(cfg: Config) -> bool:
  """Whether PPO's old log-probs come from the update's own forward under stop-gradient.

  Needed when the sampler decodes in another dtype than training computes in (its log-probs are
  then not the training forward's). With one epoch of one minibatch and no critic the update's
  forward runs the same weights on the same tokens as that recompute would, so the first (and
  only) ratio is exactly 1 and one forward of the actor per step is saved.
  """
  return (
    not decodes_as_trained(cfg.sampling, cfg.model)
    and cfg.ppo.epochs == 1
    and cfg.ppo.minibatches == 1
    and not advantages.get(cfg.ppo.advantage).critic
  )


def _advantage_stats(adv: advantages.Advantages, mask: jax.Array) -> dict:
  return {
    "kl": losses.masked_mean(adv.kl, mask),
    "kl_seq": jnp.mean(jnp.sum(adv.kl * mask, axis=1)),
    "return_mean": jnp.mean(adv.return_per_seq),
  }


def make_experience(
  roles: Roles, state: RLHBState, ro: Rollout, seq_reward: jax.Array, cfg: Config
):
  """Reference log-probs, values (GAE) and advantages of the rollouts.

  The old log-probs are the sampler's own (the policy the tokens were drawn from), so no second
  forward of the actor is needed, unless the sampler decodes in another dtype than training
  computes in (float32 decoding of a bfloat16-trained actor on the CPU): then they are the
  training forward's, so that the first PPO ratio is exactly 1, and with `fused_old_logprobs`
  that forward is the PPO update's own (the advantages are then computed there too). The
  reference is a separate frozen copy without LoRA and the actor's base with adapters off with it.
  """
  mask = ro.mask.astype(jnp.float32)
  if state.ref:
    ref, adapters = state.ref, True
  else:
    ref, adapters = full(state, "actor"), False
  ref_logits = policy_logits(roles.actor, ref, *ro[:4], _temperature(cfg), adapters=adapters)
  ref_lp = token_logprobs(ref_logits, ro.tokens)
  stats = {"response_length": jnp.mean(mask.sum(axis=1))}
  values = jnp.zeros_like(mask)
  if fused_old_logprobs(cfg):
    exp = Experience(*ro[:4], None, values, None, None, seq_reward, ref_lp)
    return exp, stats
  old_lp = ro.logprobs
  if not decodes_as_trained(cfg.sampling, cfg.model):
    actor_logits = policy_logits(roles.actor, full(state, "actor"), *ro[:4], _temperature(cfg))
    old_lp = jax.lax.stop_gradient(token_logprobs(actor_logits, ro.tokens)) * mask
  estimator = advantages.get(cfg.ppo.advantage)
  if estimator.critic:
    values = critic_values(roles.critic, full(state, "critic"), *ro[:4])
  adv = estimator.fn(
    seq_reward, old_lp, ref_lp, values if estimator.critic else None, mask, state.kl_coef, cfg.ppo
  )
  exp = Experience(*ro[:4], old_lp, values, adv.advantages, adv.returns, seq_reward, ref_lp)
  return exp, stats | _advantage_stats(adv, mask)


def ppo_update(roles: Roles, state: RLHBState, exp: Experience, rng: jax.Array, cfg: Config):
  """Epochs x minibatches of clipped PPO on actor and critic, as one `lax.scan`.

  Actor and critic optimizers each skip an update whose gradients are not finite
  (optax.apply_if_finite); a minibatch with a non-finite loss or gradient is counted in
  `nonfinite`.
  """
  ppo = cfg.ppo
  B = exp.tokens.shape[0]
  M = ppo.minibatches
  mb_size = B // M
  perms = jax.vmap(lambda k: jax.random.permutation(k, B))(jax.random.split(rng, ppo.epochs))
  order = perms.reshape(ppo.epochs * M, mb_size)
  if exp.old_logprobs is None:  # fused: the advantages need each prompt's rollouts in order
    order = jnp.arange(B)[None]

  with_critic = advantages.get(ppo.advantage).critic

  def loss_fn(actor, critic, mb: Experience):
    mask = mb.mask.astype(jnp.float32)
    logits = policy_logits(
      roles.actor, lora.join(actor, state.frozen["actor"]), *mb[:4], _temperature(cfg)
    )
    logp = token_logprobs(logits, mb.tokens)
    old_lp, adv, stats = mb.old_logprobs, mb.advantages, {}
    if old_lp is None:  # fused_old_logprobs: this forward is the old policy's
      old_lp = jax.lax.stop_gradient(logp) * mask
      out = advantages.get(ppo.advantage).fn(
        mb.seq_reward, old_lp, mb.ref_logprobs, None, mask, state.kl_coef, ppo
      )
      adv, stats = out.advantages, _advantage_stats(out, mask)
    pl, pm = losses.ppo_policy_loss(logp, old_lp, adv, mask, ppo.clip_eps, ppo.dual_clip)
    ent = losses.entropy_from_logits(logits, mask)
    loss = pl - ppo.entropy_coef * ent
    metrics = stats | {
      "policy_loss": pl,
      "entropy": ent,
      "clip_frac": pm["clip_frac"],
      "approx_kl": pm["approx_kl"],
    }
    if with_critic:
      critic_full = lora.join(critic, state.frozen["critic"])
      values = critic_values(roles.critic, critic_full, *mb[:4])
      vl, vm = losses.value_loss(values, mb.old_values, mb.returns, mask, ppo.value_clip)
      loss = loss + ppo.value_coef * vl
      metrics |= {
        "value_loss": vl,
        "value_clip_frac": vm["clip_frac"],
        "explained_variance": losses.explained_variance(values, mb.returns, mask),
      }
    return loss, metrics

  grad_fn = jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True)

  def body(carry, idx):
    actor, actor_opt, critic, critic_opt, skipped, run = carry
    mb = jax.tree.map(lambda x: x[idx], exp)
    (loss, metrics), (g_a, g_c) = grad_fn(actor, critic, mb)
    finite = all_finite(loss, g_a, g_c)
    # Each optimizer skips its update when its gradients are not finite.
    up_a, actor_opt = roles.actor_tx.update(g_a, actor_opt, actor)
    up_c, critic_opt = roles.critic_tx.update(g_c, critic_opt, critic)
    actor, critic = optax.apply_updates(actor, up_a), optax.apply_updates(critic, up_c)
    skipped = skipped + (~finite).astype(jnp.int32)
    run = jnp.where(finite, 0, run + 1)
    metrics |= {"actor_grad_norm": optax.global_norm(g_a)}
    if with_critic:
      metrics |= {"critic_grad_norm": optax.global_norm(g_c)}
    return (actor, actor_opt, critic, critic_opt, skipped, run), metrics

  init = (
    state.actor,
    state.actor_opt,
    state.critic,
    state.critic_opt,
    state.nonfinite,
    state.nonfinite_run,
  )
  (actor, actor_opt, critic, critic_opt, skipped, run), metrics = jax.lax.scan(body, init, order)
  state = state.replace(
    actor=actor,
    actor_opt=actor_opt,
    critic=critic,
    critic_opt=critic_opt,
    nonfinite=skipped,
    nonfinite_run=run,
  )
  return state, jax.tree.map(jnp.nanmean, metrics)


def fused_disc_scoring(cfg: Config) -> bool:
  """Whether D scores the rollouts inside its own update (`disc_update(scored=B)`) rather than
  in a pass of its own: with the plain D reward (no contrast prefix, no reward model beside it)
  and one D update per step, that update's forward runs the very weights the reward reads."""
  return rewards.disc_score_only(cfg) and cfg.disc.updates_per_step == 1


def _disc_updates(roles: Roles, cfg: Config, state: RLHBState, batch, ro, raw_reward):
  """`disc.updates_per_step` D updates on real, swapped and the rollouts' generated triplets."""
  if not (rewards.uses_disc(cfg) and cfg.disc.updates_per_step > 0):
    return state, {}
  db = disc_batch(batch, ro, raw_reward, cfg)

  def d_body(carry, _):
    p, o = carry
    p, o, m, _ = disc_update(roles.disc, roles.disc_tx, p, o, db, cfg, state.frozen["disc"])
    return (p, o), m

  (disc, disc_opt), dm = jax.lax.scan(
    d_body, (state.disc, state.disc_opt), None, length=cfg.disc.updates_per_step
  )
  return _with_disc(state, disc, disc_opt, jax.tree.map(lambda x: x[-1], dm))


def _with_disc(state: RLHBState, disc, disc_opt, metrics: dict):
  skipped = (1 - metrics["disc_finite"]).astype(jnp.int32)
  return state.replace(disc=disc, disc_opt=disc_opt, nonfinite=state.nonfinite + skipped), metrics


def _rollout_reward_and_disc(roles: Roles, cfg: Config, state: RLHBState, batch: dict, rng):
  """The rollouts, their rewards, and (with `fused_disc_scoring`) D's update from the forward
  that scored them. Returns (rollout, raw reward, metrics, the next D or None, PPO's key)."""
  rng = jax.random.fold_in(rng, state.step)
  k_roll, k_ppo = jax.random.split(rng)
  ro = rollout(roles, full(state, "actor"), batch, k_roll, cfg)
  disc = None
  if fused_disc_scoring(cfg):
    db = disc_batch(batch, ro, None, cfg)
    B = ro.tokens.shape[0]
    p, o, dm, scores = disc_update(
      roles.disc, roles.disc_tx, state.disc, state.disc_opt, db, cfg, state.frozen["disc"], B
    )
    raw_reward, reward_metrics = rewards.reward_from_scores(scores, None, cfg)
    disc = (p, o, dm)
  else:
    raw_reward, reward_metrics = rewards.sequence_reward(roles, state, batch, ro, cfg)
  reward_metrics = reward_metrics | {"reward_mean": jnp.nanmean(raw_reward)}
  return ro, raw_reward, reward_metrics, disc, k_ppo


def _update_disc(roles, cfg, state, batch, ro, raw_reward, disc):
  if disc is not None:  # fused: computed with the reward, applied now
    return _with_disc(state, *disc)
  return _disc_updates(roles, cfg, state, batch, ro, raw_reward)


def train_step(roles: Roles, cfg: Config, state: RLHBState, batch: dict, rng: jax.Array):
  """One RLHB step: rollout, score, advantages, PPO update, discriminator update(s)."""
  ro, raw_reward, reward_metrics, disc, k_ppo = _rollout_reward_and_disc(
    roles, cfg, state, batch, rng
  )
  seq_reward = losses.normalize_rewards(
    raw_reward, cfg.ppo.reward_norm, cfg.ppo.rollouts_per_prompt
  )
  exp, stats = make_experience(roles, state, ro, seq_reward, cfg)
  state, ppo_metrics = ppo_update(roles, state, exp, k_ppo, cfg)
  state, disc_metrics = _update_disc(roles, cfg, state, batch, ro, raw_reward, disc)
  moved = ("kl", "kl_seq", "return_mean")  # computed by the update with fused old log-probs
  stats = stats | {k: ppo_metrics.pop(k) for k in moved if k in ppo_metrics}

  kl_coef = state.kl_coef
  if cfg.ppo.adaptive_kl:
    kl_coef = losses.update_kl_coef(
      kl_coef, stats["kl_seq"], cfg.ppo.kl_target, cfg.ppo.kl_horizon, exp.tokens.shape[0]
    )
  state = state.replace(step=state.step + 1, kl_coef=kl_coef)
  metrics = {
    **stats,
    **ppo_metrics,
    **disc_metrics,
    **reward_metrics,
    "kl_coef": kl_coef,
    "nonfinite": state.nonfinite,
    "nonfinite_run": state.nonfinite_run,
  }
  return state, metrics


def lead_step(roles: Roles, cfg: Config, state: RLHBState, batch: dict, rng: jax.Array):
  """One step of the discriminator's lead (`rlhb.disc_lead_steps`): the rollout, its reward and
  D's update, as `train_step` computes them; the actor, its optimizer and the reference are not
  touched (no reference forward, no PPO forward or backward)."""
  ro, raw_reward, reward_metrics, disc, _ = _rollout_reward_and_disc(roles, cfg, state, batch, rng)
  state, disc_metrics = _update_disc(roles, cfg, state, batch, ro, raw_reward, disc)
  state = state.replace(step=state.step + 1)
  metrics = {
    **disc_metrics,
    **reward_metrics,
    "response_length": jnp.mean(ro.mask.astype(jnp.float32).sum(axis=1)),
    "kl_coef": state.kl_coef,
    "nonfinite": state.nonfinite,
    "nonfinite_run": state.nonfinite_run,
  }
  return state, metrics


def compile_train_step(roles: Roles, cfg: Config, state_sh, batch_sh, mesh: Mesh, fn=train_step):
  """The one jitted RLHB step (or `fn=lead_step`, D's lead), with shardings and the state
  donated."""
  rep = sharding.replicated(mesh)
  return jax.jit(
    functools.partial(fn, roles, cfg),
    in_shardings=(state_sh, batch_sh, rep),
    out_shardings=(state_sh, rep),
    donate_argnums=(0,),
  )
