"""Serve a policy over HTTP and record user behaviors: `python -m rlhb_jax.serve`.

  python -m rlhb_jax.serve --config configs/default.py --workdir runs/demo [--config.serve.port=0]
  python -m rlhb_jax.serve --config CFG --workdir DIR --policy=echo   # no model: a test stand-in

Flags are those of `rlhb_jax.main`; `config.serve` holds the `ServeConfig` options (a config without
that section serves with the defaults). See docs/SERVING.md.
"""

import dataclasses
from typing import Any

from absl import app, flags
from ml_collections import config_flags

from rlhb_jax.serving import EchoPolicy, ServeConfig, run_server

_CONFIG = config_flags.DEFINE_config_file("config", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (feedback.db, checkpoints).")
_POLICY = flags.DEFINE_enum(
  "policy",
  "model",
  ["model", "echo"],
  "model: the run's latest checkpoint; echo: a deterministic stand-in, no JAX (tests, smoke runs).",
)
flags.mark_flags_as_required(["config", "workdir"])


def build_serve_config(config: Any) -> ServeConfig:
  """The `serve` section of a (ConfigDict) config as a frozen `ServeConfig`."""
  if "serve" not in config:
    return ServeConfig()
  values = dict(config.serve.to_dict() if hasattr(config.serve, "to_dict") else config.serve)
  unknown = set(values) - {f.name for f in dataclasses.fields(ServeConfig)}
  if unknown:
    raise KeyError(f"config.serve: unknown keys {sorted(unknown)}")
  if "feedback_types" in values:
    values["feedback_types"] = tuple(values["feedback_types"])
  return ServeConfig(**values)


def main(argv: list[str]) -> None:
  del argv
  serve_config = build_serve_config(_CONFIG.value)
  if _POLICY.value == "echo":
    policy = EchoPolicy()
  else:
    import pathlib

    from rlhb_jax import config as config_lib
    from rlhb_jax.serving.policy import from_run

    cfg = config_lib.replace(config_lib.from_configdict(_CONFIG.value), serve=serve_config)
    policy = from_run(cfg, pathlib.Path(_WORKDIR.value))
  run_server(serve_config, _WORKDIR.value, policy)


if __name__ == "__main__":
  app.run(main)
