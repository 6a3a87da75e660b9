"""Command line: `python -m rlhb_jax.main --config configs/NAME.py --workdir DIR [--config.a=v]`.

Parses flags, converts the locked config once into frozen dataclasses, initialises multi-host JAX
when asked, and dispatches on `config.mode` through `MODES`, the one table of modes.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import logging
import pathlib
import sys
from collections.abc import Callable

import jax
from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from rlhb_jax import config as config_lib

_CONFIG = config_flags.DEFINE_config_file(
  "config", None, "Path to a config file.", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", "runs/default", "Run directory (outputs, checkpoints).")


@dataclasses.dataclass(frozen=True)
class Mode:
  """What `config.mode=NAME` runs: a job `module:function(cfg, workdir)`, or training stages
  `module:function(run)` run in order on one run directory (each skips what is already done)."""

  help: str
  job: str = ""
  stages: tuple[str, ...] = ()
  single_process: bool = False  # it serves, or writes files a second process would race
  live: bool = False  # it learns from live behaviour: no reward source that reads the simulator


_SFT = "methods.sft:sft"
_DISC = "methods.disc:disc_warmup"

# The one table of modes.
MODES = {
  "pipeline": Mode(
    "simulate -> tokenizer -> SFT -> D warm-up -> RLHB -> eval", "jobs.pipeline:run"
  ),
  "generate": Mode(
    "greedy or sampled answers to prompts", "jobs.generate:run", single_process=True
  ),
  "simulate": Mode("write simulated logs", "jobs.simulate:run", single_process=True),
  "inspect_logs": Mode("validate and summarise logs", "jobs.inspect_logs:run", single_process=True),
  "sft": Mode("behavior-conditioned SFT", stages=(_SFT,)),
  "disc_warmup": Mode("discriminator warm-up", stages=(_DISC,)),
  "rlhb": Mode("SFT, D warm-up, RLHB", stages=(_SFT, _DISC, "methods.ppo.stages:rlhb")),
  "eval": Mode("every trained generator of the run, scored", "eval.evaluate:run"),
  "reward_model": Mode("RLHF's reward model", stages=(_SFT, "methods.reward_model:reward_model")),
  "rlhf": Mode("SFT, reward model, PPO on it", stages=(_SFT, "methods.ppo.stages:rlhf")),
  "behavior_classifier": Mode(
    "RLHBC's behavior classifier", stages=(_SFT, "methods.classifier:behavior_classifier")
  ),
  "rlhbc": Mode("SFT, classifier, PPO on it", stages=(_SFT, "methods.ppo.stages:rlhbc")),
  "rlhf_rlhb": Mode(
    "RLHB from the RLHF policy (Q2)", stages=(_SFT, "methods.ppo.stages:rlhf_rlhb")
  ),
  "dpo": Mode("offline DPO from SFT", stages=(_SFT, "methods.dpo:dpo")),
  "kto": Mode("offline KTO from SFT", stages=(_SFT, "methods.kto:kto")),
  "online": Mode(
    "rounds of deploy -> collect -> train", "jobs.online:run", single_process=True, live=True
  ),
  "serve": Mode("the newest generator over HTTP", "jobs.serve:run", single_process=True),
  "keys": Mode("add, list or revoke the server's API keys", "jobs.keys:run", single_process=True),
  "export": Mode("a model as HF or GGUF", "jobs.export:run", single_process=True),
  "compile": Mode(
    "every jitted step compiled for config.compile.topology, from abstract shapes",
    "jobs.compile:run",
    single_process=True,
  ),
}


def resolve(target: str) -> Callable:
  """`module:function` under rlhb_jax, imported on demand."""
  module, _, name = target.partition(":")
  return getattr(importlib.import_module(f"rlhb_jax.{module}"), name)


def run_stages(cfg: config_lib.Config, workdir: pathlib.Path, stages: tuple[str, ...]) -> dict:
  from rlhb_jax.run import Run

  run_ = Run(cfg, workdir).prepare()
  for stage in stages:
    resolve(stage)(run_)
  return {"workdir": str(workdir)}


def initialize_distributed(cfg: config_lib.DistributedConfig) -> None:
  """Joins the processes of one job: explicitly (coordinator, count, index) or as the platform
  tells (TPU pods, SLURM). CPU processes talk through gloo."""
  if not (cfg.enabled or cfg.coordinator):
    return
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if cfg.coordinator:
    jax.distributed.initialize(
      coordinator_address=cfg.coordinator,
      num_processes=cfg.num_processes,
      process_id=cfg.process_id,
    )
  else:
    jax.distributed.initialize()


def config_problem(cfg: config_lib.Config) -> str | None:
  """Why `cfg.mode` cannot run with the rest of `cfg` (no config section can check it), or None."""
  if cfg.mode not in MODES:
    return f"config.mode={cfg.mode!r}: expected one of {tuple(MODES)}"
  from rlhb_jax.methods.ppo import rewards

  if MODES[cfg.mode].live and rewards.get(cfg.reward.source).simulator_only:
    return (
      f"config.reward.source={cfg.reward.source} is an offline ceiling (mode=rlhb, pipeline); "
      f"mode={cfg.mode} learns from what the users do, so use disc"
    )
  return None


def multi_process_problem(cfg: config_lib.Config) -> str | None:
  """Why `cfg` cannot run in several processes, or None."""
  if MODES[cfg.mode].single_process:
    return (
      f"config.mode={cfg.mode} runs in one process only; start it without the launcher and "
      "without config.distributed"
    )
  from rlhb_jax.methods.ppo import rewards

  if rewards.get(cfg.reward.source).single_process:
    return f"config.reward.source={cfg.reward.source} (a host callback) runs in one process only"
  return None


def run(cfg: config_lib.Config, workdir: pathlib.Path) -> dict:
  workdir.mkdir(parents=True, exist_ok=True)
  # The first job in a run directory writes config.json; later ones (eval, generate, a resumed
  # stage) write config_<mode>.json beside it, so the training config is never overwritten.
  path = workdir / "config.json"
  if path.exists():
    path = workdir / f"config_{cfg.mode}.json"
  if jax.process_index() == 0:
    path.write_text(json.dumps(config_lib.to_configdict(cfg).to_dict(), indent=2, default=list))
  mode = MODES[cfg.mode]
  if mode.stages:
    return run_stages(cfg, workdir, mode.stages)
  return resolve(mode.job)(cfg, workdir)


def _host_key() -> str:
  """A folder name per jax version and host CPU: XLA's CPU code is compiled for the host's
  instruction set (AVX-512, AMX, ...), so a cache shared across machines (a network home) must
  not hand one CPU's code to another."""
  import hashlib
  import platform

  from rlhb_jax.model.precision import cpu_flags

  cpu = platform.machine() + " ".join(sorted(cpu_flags()))
  return hashlib.sha256(f"{jax.__version__}|{cpu}".encode()).hexdigest()[:16]


def enable_compile_cache(directory: str) -> None:
  """XLA's persistent compilation cache under `directory` (config.checkpoint.compile_cache). JAX
  keys each entry by the HLO, the compile options, the backend and the jax/jaxlib versions, and
  never caches a computation with host callbacks (the simulator's reward), so an entry is reused
  only for the very computation it was compiled from."""
  if not directory:
    return
  path = pathlib.Path(directory).expanduser() / _host_key()
  path.mkdir(parents=True, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", str(path))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  absl_logging.set_verbosity(absl_logging.WARNING)  # keep Orbax / grain chatter out of the log
  logging.getLogger("rlhb_jax").setLevel(logging.INFO)
  if _CONFIG.value is None:
    raise app.UsageError("--config is required, e.g. --config configs/default.py")
  try:
    cfg = config_lib.from_configdict(_CONFIG.value)
    if problem := config_problem(cfg):
      raise ValueError(problem)
  except (KeyError, TypeError, ValueError) as e:
    print(f"config error: {e}", file=sys.stderr)
    sys.exit(2)
  initialize_distributed(cfg.distributed)
  enable_compile_cache(cfg.checkpoint.compile_cache)
  if jax.process_count() > 1 and (problem := multi_process_problem(cfg)):
    print(f"config error: {problem}", file=sys.stderr)
    sys.exit(2)
  from rlhb_jax.data import BadRecordError
  from rlhb_jax.eval.evaluate import MissingModelError
  from rlhb_jax.jobs.export import ExportError
  from rlhb_jax.jobs.keys import KeysError

  try:
    run(cfg, pathlib.Path(_WORKDIR.value))
  except BadRecordError as e:
    print(f"bad record: {e}", file=sys.stderr)
    sys.exit(3)
  except ExportError as e:
    print(f"export error: {e}", file=sys.stderr)
    sys.exit(2)
  except KeysError as e:
    print(f"keys error: {e}", file=sys.stderr)
    sys.exit(2)
  except MissingModelError as e:
    print(f"eval error: {e}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  app.run(main)
