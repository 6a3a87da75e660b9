"""Llama-3-8B-Instruct on a TPU v4-32 slice (4 hosts x 4 chips, 32 GiB HBM each, 512 GiB in all).

Untested here (no TPU was available while writing it). Multi-host: `distributed.enabled=True` calls
jax.distributed.initialize(); run the same command on every host (docs/TPU.md shows gcloud's
`--worker=all`). Data x FSDP x tensor = 2 x 4 x 2. The v5e-8 config's LoRA setup with f32
master weights for the two 8B bases (32 GB each) and twice the prompts per step.
"""

import pathlib

from rlhb_jax import config as config_lib


def get_config():
  c = config_lib.load_configdict(pathlib.Path(__file__).with_name("tpu_v5e_8_llama3_8b.py"))
  c.distributed.enabled = True
  c.mesh.shape = (2, 4, 2)
  c.model.param_dtype = "float32"  # room for f32 base weights
  c.ppo.prompts_per_step = 64
  c.compile.topology = "v4:2x2x4"  # the v4-32 slice: 4 hosts x 4 chips (libtpu's description)
  return c
