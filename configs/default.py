"""The embedded default (what `make demo` runs): the built-in simulator and a tiny model.

  python -m rlhb_jax.main --config configs/default.py --workdir runs/demo

Everything not set here is the documented default of rlhb_jax/config.py.
"""

from rlhb_jax import config as config_lib


def get_config():
  config = config_lib.default_configdict()
  config.mode = "pipeline"
  # A short behavior sentence keeps the tiny model's prompts in the 64-token bucket.
  config.behavior.sentence = "Users: {clauses}."
  return config
