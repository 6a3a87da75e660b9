"""mode=serve: the run's newest generator over HTTP (same as `python -m rlhb_jax.serve`)."""

from __future__ import annotations

import pathlib

from rlhb_jax.config import Config
from rlhb_jax.serving import run_server
from rlhb_jax.serving.policy import from_run


def run(cfg: Config, workdir: pathlib.Path) -> dict:
  run_server(cfg.serve, workdir, from_run(cfg, workdir))
  return {"workdir": str(workdir)}
