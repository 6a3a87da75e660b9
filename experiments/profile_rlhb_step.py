"""Where one RLHB step of a config goes: each phase jitted alone and timed, beside the whole step.

  python experiments/profile_rlhb_step.py [--config configs/default.py] [--repeats 5]
      [--workdir runs/profile] [--set ppo.rollouts_per_prompt=8 ...]

Phases, in the order the step runs them (methods/ppo/step.py):
  rollout      prefill and decode of prompts_per_step x rollouts_per_prompt rows (the sampler)
  reward       D's scoring of the rollouts (rewards.py; inside D's update with
               `step.fused_disc_scoring`)
  old_logprobs the training forward's log-probs of the rollouts (only when decoding and training
               compute in different dtypes, and not folded into the update:
               `step.fused_old_logprobs`)
  ref_logprobs the reference's log-probs (the actor's base with adapters off under LoRA)
  actor_update PPO's forward and backward over epochs x minibatches, the optimizer
  disc_update  D's forward and backward on real, swapped and generated rows, the optimizer
and the step itself (the one jitted function the stage runs), its D-only lead step when the config
has a lead, and the host's batch building. Each figure is the median of `--repeats` calls after one
compiling call; the phases run on the generator before any training (the SFT stage is skipped), so
response lengths are those of the starting model. Prints one JSON line at the end.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import platform
import statistics
import subprocess
import tempfile
import time

import jax

from rlhb_jax import config as config_lib
from rlhb_jax.methods.disc import disc_batch, disc_update
from rlhb_jax.methods.ppo import rewards, stages
from rlhb_jax.methods.ppo import step as ppo_step
from rlhb_jax.methods.ppo.state import full
from rlhb_jax.model.sampling import decodes_as_trained
from rlhb_jax.run import Run
from rlhb_jax.training import losses
from rlhb_jax.training.forward import policy_logits, token_logprobs


def cpu_model() -> str:
  try:
    out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    for line in out.splitlines():
      if line.startswith("Model name:"):
        return line.split(":", 1)[1].strip()
  except (OSError, subprocess.CalledProcessError):
    pass
  return platform.processor() or "unknown"


def timed(fn, *args, repeats: int) -> tuple[float, float]:
  """(compile + first call seconds, median seconds of `repeats` later calls)."""
  t0 = time.perf_counter()
  jax.block_until_ready(fn(*args))
  first = time.perf_counter() - t0
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return first, statistics.median(times)


def profile(cfg, workdir: pathlib.Path, repeats: int) -> dict:
  run = Run(cfg, workdir).prepare()
  cfg = stages.ppo_config(cfg, cfg.reward.source)
  batcher = run.batcher
  t0 = time.perf_counter()
  for s in range(repeats):
    batcher.rlhb(s)
  host_batch = (time.perf_counter() - t0) / repeats
  batch = batcher.rlhb(0)
  setup = stages.setup_rlhb(run, batch, cfg)
  state, step_fn, mesh, roles = setup.state, setup.step, setup.mesh, setup.roles
  rng = jax.random.key(0)
  temp = 1.0 if cfg.sampling.greedy else cfg.sampling.temperature
  out: dict = {"host_batch": (0.0, host_batch)}
  with jax.set_mesh(mesh):
    roll = jax.jit(lambda st, b, k: ppo_step.rollout(roles, full(st, "actor"), b, k, cfg))
    out["rollout"] = timed(roll, state, batch, rng, repeats=repeats)
    ro = roll(state, batch, rng)
    reward = jax.jit(lambda st, b, r: rewards.sequence_reward(roles, st, b, r, cfg)[0])
    fused_d = ppo_step.fused_disc_scoring(cfg)  # then D's update scores the rollouts
    if not fused_d:
      out["reward"] = timed(reward, state, batch, ro, repeats=repeats)
    raw = reward(state, batch, ro)

    def logprobs(st, r, adapters):
      params = full(st, "actor") if not st.ref else st.ref
      logits = policy_logits(roles.actor, params, *r[:4], temp, adapters=adapters and not st.ref)
      return token_logprobs(logits, r.tokens)

    if not decodes_as_trained(cfg.sampling, cfg.model) and not ppo_step.fused_old_logprobs(cfg):
      old = jax.jit(lambda st, r: logprobs(st, r, True))
      out["old_logprobs"] = timed(old, state, ro, repeats=repeats)
    ref = jax.jit(lambda st, r: logprobs(st, r, False))
    out["ref_logprobs"] = timed(ref, state, ro, repeats=repeats)

    def experience(st, r, raw):
      seq = losses.normalize_rewards(raw, cfg.ppo.reward_norm, cfg.ppo.rollouts_per_prompt)
      return ppo_step.make_experience(roles, st, r, seq, cfg)[0]

    exp = jax.jit(experience)(state, ro, raw)
    update = jax.jit(lambda st, e, k: ppo_step.ppo_update(roles, st, e, k, cfg)[0].actor)
    out["actor_update"] = timed(update, state, exp, rng, repeats=repeats)
    if rewards.uses_disc(cfg):

      def d_update(st, b, r, raw):
        db = disc_batch(b, r, None if fused_d else raw, cfg)
        scored = r.tokens.shape[0] if fused_d else 0
        return disc_update(
          roles.disc, roles.disc_tx, st.disc, st.disc_opt, db, cfg, st.frozen["disc"], scored
        )[0]

      out["disc_update"] = timed(jax.jit(d_update), state, batch, ro, raw, repeats=repeats)

    def whole(fn, st):
      """A donating step: each call gets the state the previous one returned."""
      holder = {"state": st}

      def call():
        holder["state"], m = fn(holder["state"], batch, rng)
        return m

      return timed(call, repeats=repeats)

    if stages.lead_steps(cfg) > 0:
      state_copy = jax.tree.map(lambda x: x.copy(), state)
      out["step (D-only lead)"] = whole(setup.lead, state_copy)
    out["step"] = whole(step_fn, state)
  return {k: {"first_s": round(a, 3), "median_s": round(b, 3)} for k, (a, b) in out.items()}


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  ap.add_argument("--config", default="configs/default.py")
  ap.add_argument("--repeats", type=int, default=5)
  ap.add_argument("--workdir", default="")
  ap.add_argument(
    "--set", nargs="*", default=[], help="config overrides, key=value (python literal)"
  )
  args = ap.parse_args()
  cd = config_lib.load_configdict(args.config)
  for item in args.set:
    key, _, value = item.partition("=")
    node = cd
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = type(node[leaf])(eval(value)) if not isinstance(node[leaf], str) else value
  cfg = config_lib.from_configdict(cd)
  with tempfile.TemporaryDirectory() as tmp:
    workdir = pathlib.Path(args.workdir or tmp)
    res = profile(cfg, workdir, args.repeats)
  step = res["step"]["median_s"]
  print(f"CPU: {cpu_model()}   jax {jax.__version__}   backend {jax.default_backend()}")
  print(f"{'phase':<22}{'median s':>10}{'share of step':>15}{'first call s':>14}")
  for k, v in res.items():
    print(f"{k:<22}{v['median_s']:>10.3f}{v['median_s'] / step:>15.1%}{v['first_s']:>14.1f}")
  print(json.dumps({"cpu": cpu_model(), "config": args.config, "set": args.set, "phases": res}))


if __name__ == "__main__":
  main()
