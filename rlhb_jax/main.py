"""Command line: `python -m rlhb_jax.main --config configs/NAME.py --workdir DIR [--config.a=v]`.

Parses flags, converts the locked config once into frozen dataclasses, initialises multi-host JAX
when asked, and dispatches on `config.mode` to `rlhb_jax.jobs.<module>.run(config, workdir)`.
"""

from __future__ import annotations

import importlib
import json
import logging
import pathlib
import sys

import jax
from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from rlhb_jax import config as config_lib

_CONFIG = config_flags.DEFINE_config_file(
  "config", None, "Path to a config file.", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", "runs/default", "Run directory (outputs, checkpoints).")

# config.mode -> module under rlhb_jax.jobs
JOBS = {
  "pipeline": "pipeline",
  "generate": "generate",
  "simulate": "simulate",
  "inspect_logs": "inspect_logs",
  "sft": "train",
  "disc_warmup": "train",
  "rlhb": "train",
  "eval": "evaluate",
  "reward_model": "train",
  "rlhf": "train",
  "behavior_classifier": "train",
  "rlhbc": "train",
  "rlhf_rlhb": "train",
  "dpo": "train",
  "kto": "train",
  "online": "online",
  "serve": "serve",
  "export": "export",
}


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


def multi_process_problem(cfg: config_lib.Config) -> str | None:
  """Why `cfg` cannot run in several processes, or None."""
  if cfg.mode in cfg.distributed.single_process_modes:
    return (
      f"config.mode={cfg.mode} runs in one process only; start it without the launcher and "
      "without config.distributed"
    )
  if cfg.reward.source == "sim":
    return "config.reward.source=sim (a host callback into the simulator) runs in one process only"
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
  module = importlib.import_module(f"rlhb_jax.jobs.{JOBS[cfg.mode]}")
  return module.run(cfg, workdir)


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  absl_logging.set_verbosity(absl_logging.WARNING)  # keep Orbax / grain chatter out of the log
  logging.getLogger("rlhb_jax").setLevel(logging.INFO)
  if _CONFIG.value is None:
    raise app.UsageError("--config is required, e.g. --config configs/default.py")
  try:
    cfg = config_lib.from_configdict(_CONFIG.value)
  except (KeyError, TypeError, ValueError) as e:
    print(f"config error: {e}", file=sys.stderr)
    sys.exit(2)
  initialize_distributed(cfg.distributed)
  if jax.process_count() > 1 and (problem := multi_process_problem(cfg)):
    print(f"config error: {problem}", file=sys.stderr)
    sys.exit(2)
  from rlhb_jax.data import BadRecordError
  from rlhb_jax.jobs.export import ExportError

  try:
    run(cfg, pathlib.Path(_WORKDIR.value))
  except BadRecordError as e:
    print(f"bad record: {e}", file=sys.stderr)
    sys.exit(3)
  except ExportError as e:
    print(f"export error: {e}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  app.run(main)
