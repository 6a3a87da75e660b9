"""The paper's comparison on the tiny model (experiments/compare_methods.py uses this).

SFT, RLHF (Bradley-Terry RM on the simulator's annotators, who favour long answers), RLHBC
(behavior classifier reward), RLHB and RLHF + RLHB on the same logs, seeds and PPO budget.

  python experiments/compare_methods.py --seeds 0,1,2
  python -m rlhb_jax.main --config configs/compare.py --workdir DIR --config.mode=rlhf  # one
"""

from rlhb_jax import config as config_lib


def get_config():
  config = config_lib.default_configdict()
  config.mode = "rlhb"
  config.behavior.sentence = "Users: {clauses}."
  # One PPO budget for every method (the 2-core CPU runs 5 methods x 3 seeds in under 45 min).
  config.rlhb.steps = 40
  config.reward.rm_steps = 100
  config.reward.rm_batch_size = 16
  config.reward.classifier_steps = 100
  config.reward.classifier_batch_size = 16
  # DPO / KTO see as many answers as PPO samples: 40 steps x 8 prompts x 4 rollouts = 1280.
  config.dpo.steps = 40
  config.dpo.batch_size = 16
  config.kto.steps = 40
  config.kto.batch_size = 32
  config.eval.curve_every = 10  # win rate vs. SFT over training, on 48 held-out queries
  return config
