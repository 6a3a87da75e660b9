"""mode=serve: the run's newest generator over HTTP (`serve.policy=echo`: a stand-in, no model)."""

from __future__ import annotations

import pathlib

from rlhb_jax.config import Config
from rlhb_jax.serving import EchoPolicy, run_server


def run(cfg: Config, workdir: pathlib.Path) -> dict:
  if cfg.serve.policy == "echo":
    policy = EchoPolicy()
  else:
    from rlhb_jax.serving.policy import from_run

    policy = from_run(cfg, workdir)
  run_server(cfg.serve, workdir, policy)
  return {"workdir": str(workdir)}
