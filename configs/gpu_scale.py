"""The tiny-model pipeline (configs/tiny.py) at a larger scale, for one GPU: does RLHB's gain over
SFT grow with the models?

  python -m rlhb_jax.main --config configs/gpu_scale.py --workdir runs/gpu_scale

Same simulator, pipeline and evaluation as configs/tiny.py, with 5x the logs (so each training
query appears with several responses and behaviors), a 25M-parameter generator and discriminator
instead of 1M, and longer SFT, warm-up and RLHB. Measured on an H200 (docs/PERFORMANCE.md,
docs/RESULTS.md "Does RLHB beat SFT?"); on the 2-core CPU it would take hours.
"""

from rlhb_jax import config as config_lib


def get_config():
  config = config_lib.default_configdict()
  config.mode = "pipeline"
  config.behavior.sentence = "Users: {clauses}."
  config.sim.num_records = 20000
  config.model.embed_dim = 512
  config.model.num_layers = 8
  config.model.num_heads = 8
  config.model.num_kv_heads = 4
  config.model.head_dim = 64
  config.model.mlp_dim = 1536
  config.sft.steps = 3000
  config.sft.batch_size = 64
  config.sft.optim.learning_rate = 5e-4
  config.disc.warmup_steps = 600
  config.disc.batch_size = 64
  config.disc.optim.learning_rate = 2e-4
  config.ppo.prompts_per_step = 32
  config.ppo.actor_optim.learning_rate = 3e-5
  config.ppo.critic_optim.learning_rate = 1e-4
  config.rlhb.steps = 200
  config.eval.num_queries = 349  # every held-out query
  config.eval.batch_size = 128
  config.checkpoint.every_steps = 500
  config.log.progress = False
  return config
