"""The pipeline on a tiny model trained from scratch: the built-in simulator, a 1M-parameter Llama
and a BPE trained on the simulator's corpus. For tests and quick checks (about 15 minutes on 2 CPU
cores); RLHB does not beat SFT on a model this small (docs/RESULTS.md). `make demo` runs
configs/default.py, the same pipeline on SmolLM2-135M-Instruct.

  python -m rlhb_jax.main --config configs/tiny.py --workdir runs/tiny

Everything not set here is the documented default of rlhb_jax/config.py.
"""

from rlhb_jax import config as config_lib


def get_config():
  config = config_lib.default_configdict()
  config.mode = "pipeline"
  # A short behavior sentence keeps the tiny model's prompts in the 64-token bucket.
  config.behavior.sentence = "Users: {clauses}."
  return config
