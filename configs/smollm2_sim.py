"""RLHB on a model that reads: SmolLM2-135M-Instruct in every role, on the built-in simulator.

  python -m rlhb_jax.main --config configs/smollm2_sim.py --workdir runs/smollm2_sim

simulate -> behavior-conditioned SFT -> discriminator warm-up -> RLHB -> evaluation, like the
default demo, but the generator, the discriminator (and, for the baselines, the RLHF reward model
and the behavior classifier) all start from the pretrained instruct model, each with LoRA adapters
of its own on a frozen base and its own head. Every stage merges its adapters into the weights it
saves, so the next stage starts from a plain model: the RLHB reference is the SFT model (the
actor's base, adapters off), and D's base is its warmed-up trunk.

Choices (README, "RLHB on a model that reads"):
- Prompts: SmolLM2's chat template with a 3-token system message ("Answer briefly.", 13 tokens
  fewer per row than its ~20-token default), a short behavior sentence, the question and the
  search result it was shown with.
- Critic-free group advantages (n = 4 rollouts per prompt, RLOO baseline scaled by the group's
  std): no value model as large as the actor.
- Reward: f(D(query, response, most preferred behavior)) alone; the contrastive reward
  D(best) - D(least preferred) ranked answers worse than a random pick (issue #11's probe).
- Exploration: 2 prompts x 8 rollouts per step at temperature 1.0. The SFT policy's greedy answer
  is already the best of its own samples at 4 rollouts and T = 0.7 (PPO on the simulator's own
  reward did not move it in 40 steps); with 8 rollouts at T = 1.0 RLHB finds the answers with a
  cited source that the "thorough" users like and that the discriminator, trained against the
  generator's bare answers, comes to reward (README, "RLHB on a model that reads").
"""

from rlhb_jax import config as config_lib


def get_config():
  c = config_lib.default_configdict()
  c.mode = "pipeline"
  c.model.source = "smollm2-135m-instruct"
  c.prompt.system = "Answer briefly."
  c.behavior.sentence = "Users: {clauses}."
  c.sampling.max_new_tokens = 24
  c.sampling.temperature = 1.0
  c.sampling.prompt_buckets = (48, 64, 80, 96, 112, 128, 160, 192, 256)
  c.sim.num_records = 4000

  for spec in (c.lora, c.disc.lora, c.reward.lora):
    spec.rank = 8
    spec.alpha = 16.0

  c.sft.steps = 120
  c.sft.batch_size = 8
  c.sft.optim.learning_rate = 3e-4

  c.disc.init_from_generator = True
  c.disc.warmup_steps = 120
  c.disc.batch_size = 8
  c.disc.mismatch_fraction = 0.5
  c.disc.optim.learning_rate = 3e-4
  c.disc.swap_fraction = 0.5

  c.ppo.advantage = "group"
  c.ppo.advantage_std = True
  c.ppo.reward_contrast = False
  c.ppo.reward_norm = "none"
  c.ppo.prompts_per_step = 2
  c.ppo.rollouts_per_prompt = 8
  c.ppo.epochs = 1  # on-policy: one update per batch (RLOO); more epochs cost a pass each
  c.ppo.minibatches = 1
  c.ppo.kl_coef = 0.05
  c.ppo.actor_optim.learning_rate = 1e-4
  c.ppo.actor_optim.warmup_steps = 2
  c.disc.optim.warmup_steps = 10
  c.rlhb.steps = 40

  c.reward.rm_steps = 120
  c.reward.rm_batch_size = 8
  c.reward.rm_optim.learning_rate = 3e-4
  c.reward.classifier_steps = 120
  c.reward.classifier_batch_size = 8
  c.reward.classifier_optim.learning_rate = 3e-4

  # DPO and KTO from the logs on RLHB's budget in answers seen: 40 steps x 16 answers (8 pairs).
  c.dpo.steps = 40
  c.dpo.batch_size = 8
  c.kto.steps = 40
  c.kto.batch_size = 16

  c.checkpoint.every_steps = 10
  c.eval.num_queries = 48
  c.eval.batch_size = 16
  return c
