"""Base config: every option with its default.

The defaults and their documentation live beside the dataclass fields in `rlhb_jax/config.py` (and
the sections it imports), so this file and the code cannot drift apart. Other configs start from
here and override a few fields.
"""

from rlhb_jax import config as config_lib


def get_config():
  return config_lib.default_configdict()
