"""The embedded default (what `make demo` runs): the built-in simulator and a tiny model.

python -m rlhb_jax.main --config configs/default.py --workdir runs/demo
"""

from rlhb_jax import config as config_lib


def get_config():
  config = config_lib.default_configdict()
  config.mode = "pipeline"
  return config
