"""Training stages: behavior-conditioned SFT, discriminator warm-up, RLHB (and its baselines' PPO).

Each stage resumes from its checkpoint in the run directory and, when done, writes its final
parameters to `models/<name>` so the next stage (or another mode) starts from them.
"""

from __future__ import annotations

import logging
import pathlib

import jax
from flax import nnx

from rlhb_jax import config as config_lib
from rlhb_jax import loop, roles, sharding, steps, supervised
from rlhb_jax.config import Config
from rlhb_jax.run import Run

log = logging.getLogger(__name__)


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


def sft(run: Run) -> None:
  cfg = run.cfg
  if run.has_params("sft_actor") or cfg.sft.steps <= 0:
    return
  model = run.base_actor()
  graphdef, params = nnx.graphdef(model), roles.params_of(model)
  tx = steps.make_optimizer(cfg.sft.optim, cfg.sft.steps)
  state = supervised.init(params, tx)
  state = loop.train_loop(
    name="sft",
    workdir=run.workdir,
    cfg=cfg,
    step_fn=supervised.compile_sft(graphdef, tx),
    state=state,
    batch_fn=run.batcher.sft,
    num_steps=cfg.sft.steps,
    rng=jax.random.key(cfg.seed),
    meta=_meta(run, "sft"),
    show=("loss", "accuracy"),
  )
  run.save_params("sft_actor", state.params)


def disc_warmup(run: Run) -> None:
  cfg = run.cfg
  if run.has_params("disc_warmup") or cfg.disc.warmup_steps <= 0:
    return
  actor = run.actor_model(prefer=("sft_actor",))
  disc = roles.build_disc(cfg, actor, run.tokenizer.vocab_size)
  graphdef, params = nnx.graphdef(disc), roles.params_of(disc)
  tx = steps.make_optimizer(cfg.disc.optim, cfg.disc.warmup_steps)
  state = loop.train_loop(
    name="disc_warmup",
    workdir=run.workdir,
    cfg=cfg,
    step_fn=supervised.compile_disc_warmup(graphdef, tx, cfg),
    state=supervised.init(params, tx),
    batch_fn=run.batcher.disc,
    num_steps=cfg.disc.warmup_steps,
    rng=jax.random.key(cfg.seed),
    meta=_meta(run, "disc_warmup"),
    show=("disc_loss", "disc_accuracy", "d_real", "d_swap"),
  )
  run.save_params("disc_warmup", state.params)


def setup_rlhb(run: Run, example_batch: dict):
  """The RLHB train state (from the SFT generator and the warmed-up D), placed on the mesh, and the
  compiled step for batches shaped like `example_batch`. Returns (state, step_fn, mesh)."""
  cfg = run.cfg
  actor = run.actor_model(prefer=("sft_actor",))
  critic = roles.scalar_from_lm(actor, 1, cfg.seed + 1)
  disc = roles.build_disc(cfg, actor, run.tokenizer.vocab_size)
  warm = run.load_params("disc_warmup", disc)
  if warm is not None:
    nnx.update(disc, warm)
  tok = run.tokenizer
  rl_roles, state = roles.init_state(cfg, actor, critic, disc, tok.eos_ids, tok.pad_id)
  mesh = sharding.make_mesh(cfg.mesh)
  models = {"actor": actor, "critic": critic, "disc": disc}
  state_sh = roles.state_shardings(rl_roles, state, models, mesh, cfg.mesh.rules)
  batch_sh = roles.batch_shardings(example_batch, mesh)
  with jax.set_mesh(mesh):
    state = jax.device_put(state, state_sh)
  step_fn = roles.compile_train_step(rl_roles, cfg, state_sh, batch_sh, mesh)
  return state, step_fn, mesh


def rlhb(run: Run) -> None:
  """The adversarial loop: PPO on the discriminator's reward, D trained on real vs. fake."""
  cfg = run.cfg
  if run.has_params("rlhb_actor"):
    return
  state, step_fn, mesh = setup_rlhb(run, run.batcher.rlhb(0))
  rows = cfg.ppo.prompts_per_step * cfg.ppo.rollouts_per_prompt
  with jax.set_mesh(mesh):
    state = loop.train_loop(
      name="rlhb",
      workdir=run.workdir,
      cfg=cfg,
      step_fn=step_fn,
      state=state,
      batch_fn=run.batcher.rlhb,
      num_steps=cfg.rlhb.steps,
      rng=jax.random.key(cfg.seed),
      meta=_meta(run, "rlhb"),
      monitor=loop.rlhb_monitor(cfg),
      rows_per_step=rows,
      show=("reward_mean", "d_real", "d_fake", "kl", "tokens_per_s"),
    )
  run.save_params("rlhb_actor", jax.device_get(state.actor))
  run.save_params("rlhb_disc", jax.device_get(state.disc))
  log.info(
    "RLHB done: %d steps, %d non-finite updates skipped", int(state.step), int(state.nonfinite)
  )


def run(cfg: Config, workdir: pathlib.Path) -> dict:
  run_ = Run(cfg, workdir)
  match cfg.mode:
    case "sft":
      sft(run_)
    case "disc_warmup":
      disc_warmup(run_)
    case "rlhb":
      sft(run_)
      disc_warmup(run_)
      rlhb(run_)
    case other:
      raise ValueError(f"jobs.train has no mode {other!r}")
  return {"workdir": str(workdir)}
