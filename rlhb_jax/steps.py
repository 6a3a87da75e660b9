"""The RLHB train step and its phases, all pure functions of pytrees.

`train_step(state, batch, rng) -> (state, metrics)` composes
  rollout -> reward (rewards.py) -> advantages (advantages.py: GAE or group) -> PPO update ->
  discriminator update
and is jitted once with shardings (`roles.compile_train_step`). Each phase is a function of its own
that can be jitted alone for tests and profiling.

Shapes: Bp prompts per step, n rollouts per prompt, B = Bp * n rows, P prompt bucket, Pd
discriminator prefix bucket, Tn new tokens, V vocab.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct

from rlhb_jax import advantages, losses, rewards
from rlhb_jax.config import Config, OptimConfig
from rlhb_jax.model import lora
from rlhb_jax.model.llama import positions_from_mask
from rlhb_jax.rewards import concat
from rlhb_jax.sampling import sample

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


def make_optimizer(cfg: OptimConfig, total_steps: int) -> optax.GradientTransformation:
  warmup = max(1, min(cfg.warmup_steps, total_steps))
  schedule = optax.join_schedules(
    [
      optax.linear_schedule(0.0, cfg.learning_rate, warmup),
      optax.constant_schedule(cfg.learning_rate),
    ],
    [warmup],
  )
  return optax.chain(
    optax.clip_by_global_norm(cfg.max_grad_norm),
    optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay),
  )


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


def policy_logits(
  actor_def,
  actor: Params,
  prompt,
  prompt_mask,
  response,
  response_mask,
  temperature: float = 1.0,
  adapters: bool = True,
):
  """Teacher-forced logits (B, Tn, V) that predict each response token, divided by the sampling
  temperature so that PPO's ratios and KL are those of the distribution the rollouts came from.
  `adapters=False` runs the base weights alone (the reference policy under LoRA)."""
  P, Tn = prompt.shape[1], response.shape[1]
  tokens, mask = concat(prompt, prompt_mask, response, response_mask)
  model = nnx.merge(actor_def, actor)
  h, _ = model.trunk(tokens, positions_from_mask(mask), mask, adapters=adapters)
  logits = model.logits(h[:, P - 1 : P - 1 + Tn])
  return logits if temperature == 1.0 else logits / temperature


def token_logprobs(logits: jax.Array, tokens: jax.Array) -> jax.Array:
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return jnp.take_along_axis(logp, tokens[..., None], axis=-1)[..., 0]


def critic_values(critic_def, critic: Params, prompt, prompt_mask, response, response_mask):
  """Value of the state before each response token: (B, Tn)."""
  P, Tn = prompt.shape[1], response.shape[1]
  tokens, mask = concat(prompt, prompt_mask, response, response_mask)
  out = nnx.merge(critic_def, critic).per_token(tokens, mask)[..., 0]
  return out[:, P - 1 : P - 1 + Tn]


def _temperature(cfg: Config) -> float:
  return 1.0 if cfg.sampling.greedy else cfg.sampling.temperature


def full(state: RLHBState, role: str) -> Params:
  """A role's whole params tree: its trainable half joined with its frozen half."""
  return lora.join(getattr(state, role), state.frozen[role])


class Experience(NamedTuple):
  prompt: jax.Array
  prompt_mask: jax.Array
  tokens: jax.Array
  mask: jax.Array
  old_logprobs: jax.Array
  old_values: jax.Array
  advantages: jax.Array
  returns: jax.Array


def make_experience(
  roles: Roles, state: RLHBState, ro: Rollout, seq_reward: jax.Array, cfg: Config
):
  """Reference log-probs, values (GAE) and advantages of the rollouts.

  The old log-probs are the sampler's own (the policy the tokens were drawn from), so no second
  forward of the actor is needed; the reference is a separate frozen copy without LoRA and the
  actor's base with adapters off with it.
  """
  mask = ro.mask.astype(jnp.float32)
  old_lp = ro.logprobs
  if state.ref:
    ref, adapters = state.ref, True
  else:
    ref, adapters = full(state, "actor"), False
  ref_logits = policy_logits(roles.actor, ref, *ro[:4], _temperature(cfg), adapters=adapters)
  ref_lp = token_logprobs(ref_logits, ro.tokens)
  if cfg.ppo.advantage == "gae":
    values = critic_values(roles.critic, full(state, "critic"), *ro[:4])
    adv = advantages.gae_advantages(
      seq_reward, old_lp, ref_lp, values, mask, state.kl_coef, cfg.ppo
    )
  else:
    values = jnp.zeros_like(mask)
    adv = advantages.group_advantages(seq_reward, old_lp, ref_lp, mask, state.kl_coef, cfg.ppo)
  exp = Experience(
    ro.prompt, ro.prompt_mask, ro.tokens, ro.mask, old_lp, values, adv.advantages, adv.returns
  )
  stats = {
    "kl": losses.masked_mean(adv.kl, mask),
    "kl_seq": jnp.mean(jnp.sum(adv.kl * mask, axis=1)),
    "return_mean": jnp.mean(adv.return_per_seq),
    "response_length": jnp.mean(mask.sum(axis=1)),
  }
  return exp, stats


def where_finite(finite, new, old):
  """`new` where `finite`, else `old`, leaf by leaf (skips a non-finite update inside jit)."""
  return jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)


def all_finite(*trees) -> jax.Array:
  """True when every leaf of every tree is finite."""
  leaves = [jnp.all(jnp.isfinite(x)) for t in trees for x in jax.tree.leaves(t)]
  return jnp.all(jnp.stack(leaves))


def ppo_update(roles: Roles, state: RLHBState, exp: Experience, rng: jax.Array, cfg: Config):
  """Epochs x minibatches of clipped PPO on actor and critic, as one `lax.scan`.

  A minibatch whose loss or gradients are not finite leaves parameters and optimizer states as
  they were and is counted in `nonfinite`.
  """
  ppo = cfg.ppo
  B = exp.tokens.shape[0]
  M = ppo.minibatches
  mb_size = B // M
  perms = jax.vmap(lambda k: jax.random.permutation(k, B))(jax.random.split(rng, ppo.epochs))
  order = perms.reshape(ppo.epochs * M, mb_size)

  with_critic = ppo.advantage == "gae"

  def loss_fn(actor, critic, mb: Experience):
    mask = mb.mask.astype(jnp.float32)
    logits = policy_logits(
      roles.actor, lora.join(actor, state.frozen["actor"]), *mb[:4], _temperature(cfg)
    )
    logp = token_logprobs(logits, mb.tokens)
    pl, pm = losses.ppo_policy_loss(
      logp, mb.old_logprobs, mb.advantages, mask, ppo.clip_eps, ppo.dual_clip
    )
    ent = losses.entropy_from_logits(logits, mask)
    loss = pl - ppo.entropy_coef * ent
    metrics = {
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
    up_a, new_actor_opt = roles.actor_tx.update(g_a, actor_opt, actor)
    up_c, new_critic_opt = roles.critic_tx.update(g_c, critic_opt, critic)
    new = (
      optax.apply_updates(actor, up_a),
      new_actor_opt,
      optax.apply_updates(critic, up_c),
      new_critic_opt,
    )
    actor, actor_opt, critic, critic_opt = where_finite(
      finite, new, (actor, actor_opt, critic, critic_opt)
    )
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


class DiscBatch(NamedTuple):
  tokens: jax.Array  # (R, Pd + Tn)
  mask: jax.Array
  labels: jax.Array  # (R,) 1 real, 0 fake
  weights: jax.Array  # (R,)
  kind: jax.Array  # (R,) 0 real, 1 generated, 2 behavior-swapped


def disc_batch(batch: dict, ro: Rollout | None, seq_reward, cfg: Config) -> DiscBatch:
  """Real triplets vs. generated, behavior-swapped and bootstrapped (top-rho generated) fakes.

  Real rows weigh 1 each; the fakes share the same total weight, `swap_fraction` of it on swapped
  rows. The top `bootstrap_ratio` share of generated rows by reward counts twice.
  """
  d = cfg.disc
  real_t, real_m = concat(
    batch["real_prefix"], batch["real_prefix_mask"], batch["real"], batch["real_mask"]
  )
  swap_t, swap_m = concat(
    batch["swap_prefix"], batch["swap_prefix_mask"], batch["real"], batch["real_mask"]
  )
  Bp = real_t.shape[0]
  parts_t, parts_m = [real_t, swap_t], [real_m, swap_m]
  labels = [jnp.ones(Bp), jnp.zeros(Bp)]
  kinds = [jnp.zeros(Bp, jnp.int32), jnp.full(Bp, 2, jnp.int32)]
  swap_share = d.swap_fraction if ro is not None else 1.0
  weights = [jnp.ones(Bp), jnp.full(Bp, swap_share)]
  if ro is not None:
    gen_t, gen_m = concat(ro.prefix, ro.prefix_mask, ro.tokens, ro.mask)
    B = gen_t.shape[0]
    w = jnp.full(B, (1.0 - swap_share) * Bp / B)
    if d.bootstrap_ratio > 0:
      k = max(1, int(round(d.bootstrap_ratio * B)))
      top = jax.lax.top_k(seq_reward, k)[1]
      w = w.at[top].multiply(2.0)
    parts_t.append(gen_t)
    parts_m.append(gen_m)
    labels.append(jnp.zeros(B))
    kinds.append(jnp.ones(B, jnp.int32))
    weights.append(w)
  cat = lambda xs: jnp.concatenate(xs, axis=0)
  return DiscBatch(cat(parts_t), cat(parts_m), cat(labels), cat(weights), cat(kinds))


def disc_update(disc_def, tx, params, opt_state, db: DiscBatch, cfg: Config, frozen=None):
  """One discriminator step on a DiscBatch; skipped (returns inputs) if non-finite. `params` are
  the trainable half (adapters and head under LoRA), `frozen` the base ({} or None without)."""

  def loss_fn(p):
    logits = nnx.merge(disc_def, lora.join(p, frozen or {})).last_token(db.tokens, db.mask)[:, 0]
    loss, m = losses.disc_loss(logits, db.labels, db.weights, cfg.disc.label_smoothing)
    prob = jax.nn.sigmoid(logits)
    for name, kind in (("d_real", 0), ("d_fake", 1), ("d_swap", 2)):
      sel = (db.kind == kind).astype(jnp.float32)
      m[name] = jnp.sum(prob * sel) / jnp.maximum(sel.sum(), 1.0)
    return loss, m

  (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
  finite = all_finite(loss, grads)
  updates, new_opt = tx.update(grads, opt_state, params)
  new_params = optax.apply_updates(params, updates)
  params, opt_state = where_finite(finite, (new_params, new_opt), (params, opt_state))
  metrics = {f"disc_{k}" if not k.startswith("d_") else k: v for k, v in metrics.items()}
  return (
    params,
    opt_state,
    metrics
    | {
      "disc_loss": loss,
      "disc_grad_norm": optax.global_norm(grads),
      "disc_finite": finite.astype(jnp.float32),
    },
  )


def train_step(roles: Roles, cfg: Config, state: RLHBState, batch: dict, rng: jax.Array):
  """One RLHB step: rollout, score, advantages, PPO update, discriminator update(s)."""
  rng = jax.random.fold_in(rng, state.step)
  k_roll, k_ppo = jax.random.split(rng)
  ro = rollout(roles, full(state, "actor"), batch, k_roll, cfg)
  raw_reward, reward_metrics = rewards.sequence_reward(roles, state, batch, ro, cfg)
  seq_reward = losses.normalize_rewards(
    raw_reward, cfg.ppo.reward_norm, cfg.ppo.rollouts_per_prompt
  )
  exp, stats = make_experience(roles, state, ro, seq_reward, cfg)
  state, ppo_metrics = ppo_update(roles, state, exp, k_ppo, cfg)

  disc_metrics = {}
  if rewards.uses_disc(cfg) and cfg.disc.updates_per_step > 0:
    db = disc_batch(batch, ro, raw_reward, cfg)

    def d_body(carry, _):
      p, o = carry
      p, o, m = disc_update(roles.disc, roles.disc_tx, p, o, db, cfg, state.frozen["disc"])
      return (p, o), m

    (disc, disc_opt), dm = jax.lax.scan(
      d_body, (state.disc, state.disc_opt), None, length=cfg.disc.updates_per_step
    )
    state = state.replace(disc=disc, disc_opt=disc_opt)
    disc_metrics = jax.tree.map(lambda x: x[-1], dm)
    state = state.replace(
      nonfinite=state.nonfinite + jnp.sum(1 - dm["disc_finite"]).astype(jnp.int32)
    )

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
    "reward_mean": jnp.nanmean(raw_reward),
    "kl_coef": kl_coef,
    "nonfinite": state.nonfinite,
    "nonfinite_run": state.nonfinite_run,
  }
  return state, metrics
