"""Training stages: behavior-conditioned SFT, discriminator warm-up, RLHB (and its baselines' PPO).

Each stage resumes from its checkpoint in the run directory and, when done, writes its final
parameters to `models/<name>` so the next stage (or another mode) starts from them.
"""

from __future__ import annotations

import json
import logging
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rlhb_jax import baselines, loop, offline, rewards, roles, sharding, steps, supervised
from rlhb_jax import config as config_lib
from rlhb_jax.batches import Batcher
from rlhb_jax.config import Config
from rlhb_jax.jobs import evaluate
from rlhb_jax.model import lora
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


def _train_model(
  run: Run, name: str, model, spec, tx, compile_fn, batch_fn, num_steps, show, reference=False
):
  """A supervised stage: attaches `spec`'s adapters to `model` (rank 0: trains every weight),
  runs the resumable loop on the mesh (the batch split over its data axes, the parameters placed
  by the rules table) and returns (graphdef, params) of the plain model with the adapters merged
  in, ready to save under models/<name>. `reference` keeps a frozen copy of the starting weights
  in the state when there are no adapters (the offline preference stages' reference)."""
  cfg = run.cfg
  plain = nnx.graphdef(model)
  roles.with_lora(model, spec, cfg.seed)
  params, frozen = roles.split_params(model)
  ref = jax.tree.map(jnp.copy, params) if reference and not spec.rank else None
  state = supervised.init(params, tx, frozen, ref)
  mesh = sharding.make_mesh(cfg.mesh)
  full_sh = sharding.param_shardings(
    roles.params_of(model), sharding.logical_axes(model), mesh, cfg.mesh.rules
  )
  params_sh, frozen_sh = lora.split(full_sh, roles.has_lora(model))
  rep = sharding.replicated(mesh)
  state_sh = roles.supervised_shardings(state, tx, params_sh, frozen_sh, mesh)
  batch_sh = roles.batch_shardings(batch_fn(0), mesh)
  with jax.set_mesh(mesh):
    state = sharding.place(state, state_sh)
    state = loop.train_loop(
      name=name,
      workdir=run.workdir,
      cfg=cfg,
      step_fn=compile_fn(nnx.graphdef(model), tx, (state_sh, batch_sh, rep)),
      state=state,
      batch_fn=batch_fn,
      num_steps=num_steps,
      rng=sharding.place(jax.random.key(cfg.seed), rep),
      meta=_meta(run, name),
      show=show,
      batch_shardings=batch_sh,
    )
  return plain, roles.merged_params(state.params, state.frozen, spec)


def sft(run: Run) -> None:
  cfg = run.cfg
  if run.has_params("sft_actor") or cfg.sft.steps <= 0:
    return
  tx = steps.make_optimizer(cfg.sft.optim, cfg.sft.steps)
  _, params = _train_model(
    run,
    "sft",
    run.base_actor(),
    cfg.lora,
    tx,
    supervised.compile_sft,
    run.batcher.sft,
    cfg.sft.steps,
    ("loss", "accuracy"),
  )
  run.save_params("sft_actor", params)


def disc_warmup(run: Run) -> None:
  cfg = run.cfg
  if run.has_params("disc_warmup") or cfg.disc.warmup_steps <= 0:
    return
  actor = run.actor_model(prefer=("sft_actor",))
  disc = roles.build_disc(cfg, actor, run.tokenizer.vocab_size)
  tx = steps.make_optimizer(cfg.disc.optim, cfg.disc.warmup_steps)
  compile_fn = lambda graphdef, tx, sh: supervised.compile_disc_warmup(graphdef, tx, cfg, sh)
  _, params = _train_model(
    run,
    "disc_warmup",
    disc,
    cfg.disc.lora,
    tx,
    compile_fn,
    run.batcher.disc,
    cfg.disc.warmup_steps,
    ("disc_loss", "disc_accuracy", "d_real", "d_swap"),
  )
  run.save_params("disc_warmup", params)


def ppo_config(cfg: Config, source: str) -> Config:
  """The config of a PPO stage whose reward comes from `source` (D is not trained without it)."""
  changes = {"reward.source": source}
  if not rewards.uses_disc(config_lib.replace(cfg, **changes)):
    changes["disc.updates_per_step"] = 0
  return config_lib.replace(cfg, **changes)


def _reward_roles(run: Run, cfg: Config, actor) -> tuple[Any, dict | None]:
  """The frozen reward model or behavior classifier the PPO reward of `cfg` needs, if any."""
  source = cfg.reward.source
  if source in ("rm", "disc+rm"):
    rm = roles.build_disc(cfg, actor, run.tokenizer.vocab_size, seed_offset=3)
    params = run.load_params("reward_model", rm)
    if params is None:
      raise FileNotFoundError(f"{run.workdir}/models/reward_model: run mode=reward_model first")
    nnx.update(rm, params)
    return rm, None
  if source == "classifier":
    k, n = len(cfg.behavior.names), cfg.behavior.num_bins
    clf = roles.build_disc(cfg, actor, run.tokenizer.vocab_size, k * n, seed_offset=4)
    params = run.load_params("behavior_classifier", clf)
    if params is None:
      raise FileNotFoundError(
        f"{run.workdir}/models/behavior_classifier: run mode=behavior_classifier first"
      )
    nnx.update(clf, params)
    num, den = baselines.formula_weights(cfg)
    return clf, {"bin_counts": baselines.bin_counts(run.binner), "num": num, "den": den}
  return None, None


def sim_oracle(run: Run, queries: list[str]):
  """reward.source=sim: the host function that scores rollouts with the simulated users' expected
  like rate (responses decoded exactly as evaluation decodes them)."""
  tok, sim = run.tokenizer, run.simulator
  eos = set(tok.eos_ids)

  def oracle(tokens, mask, index):
    out = np.zeros(len(index), np.float32)
    for i, (row, live, q) in enumerate(zip(tokens, mask, index, strict=True)):
      ids = [int(t) for t, m in zip(row, live, strict=True) if m and int(t) not in eos]
      out[i] = sim.expected_rates(queries[int(q)], tok.decode(ids))["like"]
    return out

  return oracle


def setup_rlhb(
  run: Run,
  example_batch: dict,
  cfg: Config | None = None,
  start: tuple[str, ...] = ("sft_actor",),
  oracle=None,
):
  """The PPO train state (generator from `start`, the warmed-up D, the frozen reward model when
  `cfg.reward.source` needs one), placed on the mesh, and the compiled step for batches shaped
  like `example_batch`. Returns (state, step_fn, mesh)."""
  cfg = cfg or run.cfg
  actor = run.actor_model(prefer=start)
  critic = None
  if cfg.ppo.advantage == "gae":
    critic = roles.with_lora(roles.scalar_from_lm(actor, 1, cfg.seed + 1), cfg.lora, cfg.seed + 1)
  disc = roles.build_disc(cfg, actor, run.tokenizer.vocab_size)
  warm = run.load_params("disc_warmup", disc)
  if warm is not None:
    nnx.update(disc, warm)
  roles.with_lora(disc, cfg.disc.lora, cfg.seed + 2)
  rm, classifier = _reward_roles(run, cfg, actor)
  roles.with_lora(actor, cfg.lora, cfg.seed)
  tok = run.tokenizer
  rl_roles, state = roles.init_state(
    cfg, actor, critic, disc, tok.eos_ids, tok.pad_id, rm=rm, classifier=classifier, oracle=oracle
  )
  mesh = sharding.make_mesh(cfg.mesh)
  models = {"actor": actor, "critic": critic, "disc": disc, "rm": rm}
  state_sh = roles.state_shardings(rl_roles, state, models, mesh, cfg.mesh.rules)
  batch_sh = roles.batch_shardings(example_batch, mesh)
  with jax.set_mesh(mesh):
    state = sharding.place(state, state_sh)
  step_fn = roles.compile_train_step(rl_roles, cfg, state_sh, batch_sh, mesh)
  return state, step_fn, mesh


def ppo(run: Run, name: str, source: str, start: tuple[str, ...]) -> None:
  """A PPO stage named `name` (rlhb, rlhf, rlhbc, rlhf_rlhb) with the reward from `source`,
  starting from the generator `start`; writes models/<name>_actor."""
  if run.has_params(f"{name}_actor"):
    return
  cfg = ppo_config(run.cfg, source)
  batcher = run.batcher
  if cfg.reward.source != "disc":  # the RM / classifier prefixes come with the batches
    batcher = Batcher(cfg, run.tokenizer, run.examples, run.best_behavior, batcher.worst)
  oracle = sim_oracle(run, batcher.queries) if cfg.reward.source == "sim" else None
  example = batcher.rlhb(0)
  state, step_fn, mesh = setup_rlhb(run, example, cfg, start, oracle)
  rows = cfg.ppo.prompts_per_step * cfg.ppo.rollouts_per_prompt
  show = ("reward_mean", "d_real", "d_fake", "kl", "tokens_per_s")
  if cfg.reward.source == "sim":
    show = ("reward_mean", "kl", "tokens_per_s")
  elif not rewards.uses_disc(cfg):
    show = ("reward_mean", "rm_reward_mean", "kl", "tokens_per_s")
  with jax.set_mesh(mesh):
    state = loop.train_loop(
      name=name,
      workdir=run.workdir,
      cfg=cfg,
      step_fn=step_fn,
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
      batch_shardings=roles.batch_shardings(example, mesh),
    )
  run.save_params(
    f"{name}_actor", roles.merged_params(state.actor, state.frozen["actor"], cfg.lora)
  )
  if rewards.uses_disc(cfg):
    run.save_params(
      f"{name}_disc", roles.merged_params(state.disc, state.frozen["disc"], cfg.disc.lora)
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


def reward_model(run: Run) -> None:
  """RLHF's Bradley-Terry reward model on pairwise preferences (held-out accuracy reported)."""
  cfg = run.cfg
  if run.has_params("reward_model") or cfg.reward.rm_steps <= 0:
    return
  actor = run.actor_model(prefer=("sft_actor",))
  rm = roles.build_disc(cfg, actor, run.tokenizer.vocab_size, seed_offset=3)
  train_pairs, heldout = baselines.split_heldout(
    run.preferences, cfg.reward.rm_heldout_fraction, cfg.seed
  )
  batcher = baselines.PairBatcher(
    cfg, run.tokenizer, train_pairs, run.batcher.Pd, cfg.reward.rm_batch_size
  )
  tx = steps.make_optimizer(cfg.reward.rm_optim, cfg.reward.rm_steps)
  graphdef, params = _train_model(
    run,
    "reward_model",
    rm,
    cfg.reward.lora,
    tx,
    baselines.compile_rm,
    batcher,
    cfg.reward.rm_steps,
    ("loss", "accuracy"),
  )
  report = {
    "heldout_accuracy": baselines.rm_accuracy(graphdef, params, batcher, heldout),
    "train_pairs": len(train_pairs),
    "heldout_pairs": len(heldout),
  }
  run.save_params("reward_model", params)
  if sharding.is_primary():
    (run.workdir / "models" / "reward_model.json").write_text(json.dumps(report, indent=2))
  log.info("reward model: held-out pairwise accuracy %.3f", report["heldout_accuracy"])


def behavior_classifier(run: Run) -> None:
  """RLHBC's classifier: one head of N bins per behavior type on (query, response)."""
  cfg = run.cfg
  if run.has_params("behavior_classifier") or cfg.reward.classifier_steps <= 0:
    return
  actor = run.actor_model(prefer=("sft_actor",))
  k, n = len(cfg.behavior.names), cfg.behavior.num_bins
  clf = roles.build_disc(cfg, actor, run.tokenizer.vocab_size, k * n, seed_offset=4)
  bins = run.binner.bin_many(r["behavior"] for r in run.records)
  idx = list(range(len(run.examples)))
  train_idx, heldout_idx = baselines.split_heldout(idx, cfg.reward.rm_heldout_fraction, cfg.seed)
  train_b = baselines.ClassifierBatcher(
    cfg,
    run.tokenizer,
    [run.examples[i] for i in train_idx],
    bins[train_idx],
    run.batcher.Pd,
  )
  tx = steps.make_optimizer(cfg.reward.classifier_optim, cfg.reward.classifier_steps)
  graphdef, params = _train_model(
    run,
    "behavior_classifier",
    clf,
    cfg.reward.lora,
    tx,
    lambda graphdef, tx, sh: baselines.compile_classifier(graphdef, tx, k, sh),
    train_b,
    cfg.reward.classifier_steps,
    ("loss", "accuracy"),
  )
  all_b = baselines.ClassifierBatcher(cfg, run.tokenizer, run.examples, bins, run.batcher.Pd)
  report = {
    "heldout_bin_accuracy": baselines.classifier_accuracy(graphdef, params, all_b, heldout_idx),
    "majority_bin_accuracy": {
      name: float(np.mean(bins[heldout_idx, j] == np.bincount(bins[train_idx, j]).argmax()))
      for j, name in enumerate(cfg.behavior.names)
    },
  }
  run.save_params("behavior_classifier", params)
  if sharding.is_primary():
    (run.workdir / "models" / "behavior_classifier.json").write_text(json.dumps(report, indent=2))
  log.info("behavior classifier: held-out bin accuracy %s", report["heldout_bin_accuracy"])


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
  source = run.cfg.reward.source if run.cfg.reward.source in ("disc", "disc+rm") else "disc"
  ppo(run, "rlhf_rlhb", source, ("rlhf_actor", "sft_actor"))


def _start_params(run: Run, plain_model) -> Any:
  """The offline stages' reference for held-out checks: the SFT generator (or the base one)."""
  params = run.load_params("sft_actor", plain_model)
  return params if params is not None else roles.params_of(run.base_actor())


def dpo_name(cfg: Config) -> str:
  return "dpo" if cfg.dpo.pairs == "behavior" else "dpo_annotators"


def dpo(run: Run) -> None:
  """DPO from the SFT generator on behavior pairs from the logs, or on the annotators' pairs
  (`dpo.pairs`); writes models/dpo_actor (or dpo_annotators_actor) and a report beside it."""
  cfg = run.cfg
  name = dpo_name(cfg)
  if run.has_params(f"{name}_actor") or cfg.dpo.steps <= 0:
    return
  if cfg.dpo.pairs == "behavior":
    pairs, report = offline.behavior_pairs(run.records, cfg)
  else:
    pairs, report = run.preferences, {"pairs": len(run.preferences)}
  train_pairs, heldout = baselines.split_heldout(pairs, cfg.dpo.heldout_fraction, cfg.seed)
  log.info("%s: %d training pairs, %d held out (%s)", name, len(train_pairs), len(heldout), report)
  batcher = offline.PairBatcher(
    cfg, run.tokenizer, run.best_behavior, train_pairs, cfg.dpo.batch_size
  )
  tx = steps.make_optimizer(cfg.dpo.optim, cfg.dpo.steps)
  graphdef, params = _train_model(
    run,
    name,
    run.actor_model(prefer=("sft_actor",)),
    cfg.lora,
    tx,
    lambda graphdef, tx, sh: offline.compile_dpo(graphdef, tx, cfg.dpo.beta, sh),
    batcher,
    cfg.dpo.steps,
    ("loss", "accuracy", "margin"),
    reference=True,
  )
  ref = _start_params(run, params)
  report["heldout_pairs"] = len(heldout)
  report["heldout_accuracy"] = offline.pair_accuracy(graphdef, params, ref, batcher, heldout)
  run.save_params(f"{name}_actor", params)
  if sharding.is_primary():
    (run.workdir / "models" / f"{name}.json").write_text(json.dumps(report, indent=2))
  log.info("%s: held-out pairwise accuracy %.3f", name, report["heldout_accuracy"])


def kto(run: Run) -> None:
  """KTO from the SFT generator on logged answers marked desirable / undesirable by their
  behavior; writes models/kto_actor and a report beside it."""
  cfg = run.cfg
  if run.has_params("kto_actor") or cfg.kto.steps <= 0:
    return
  items, report = offline.kto_examples(run.records, run.binner, cfg)
  train_items, heldout = baselines.split_heldout(items, cfg.kto.heldout_fraction, cfg.seed)
  if cfg.kto.balance:
    w_good, w_bad = offline.balanced_weights(train_items)
    cfg = config_lib.replace(
      cfg, **{"kto.desirable_weight": w_good, "kto.undesirable_weight": w_bad}
    )
  report["weights"] = [cfg.kto.desirable_weight, cfg.kto.undesirable_weight]
  log.info("kto: %d training answers, %d held out (%s)", len(train_items), len(heldout), report)
  batcher = offline.LabeledBatcher(
    cfg, run.tokenizer, run.best_behavior, train_items, cfg.kto.batch_size
  )
  tx = steps.make_optimizer(cfg.kto.optim, cfg.kto.steps)
  graphdef, params = _train_model(
    run,
    "kto",
    run.actor_model(prefer=("sft_actor",)),
    cfg.lora,
    tx,
    lambda graphdef, tx, sh: offline.compile_kto(graphdef, tx, cfg, sh),
    batcher,
    cfg.kto.steps,
    ("loss", "kl", "desirable_reward", "undesirable_reward"),
    reference=True,
  )
  ref = _start_params(run, params)
  report["heldout_answers"] = len(heldout)
  report["heldout_auc"] = offline.labeled_auc(graphdef, params, ref, batcher, heldout)
  run.save_params("kto_actor", params)
  if sharding.is_primary():
    (run.workdir / "models" / "kto.json").write_text(json.dumps(report, indent=2))
  log.info("kto: held-out desirable-vs-undesirable AUC %.3f", report["heldout_auc"])


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
    case "reward_model":
      sft(run_)
      reward_model(run_)
    case "rlhf":
      sft(run_)
      rlhf(run_)
    case "behavior_classifier":
      sft(run_)
      behavior_classifier(run_)
    case "rlhbc":
      sft(run_)
      rlhbc(run_)
    case "rlhf_rlhb":
      sft(run_)
      rlhf_rlhb(run_)
    case "dpo":
      sft(run_)
      dpo(run_)
    case "kto":
      sft(run_)
      kto(run_)
    case other:
      raise ValueError(f"jobs.train has no mode {other!r}")
  return {"workdir": str(workdir)}
