"""Llama-3-8B-Instruct on a TPU v5e-8 slice (one host, 8 chips, 16 GiB HBM each, 128 GiB in all).

Untested here (no TPU was available while writing it); sized by arithmetic, see docs/TPU.md.
Generator and discriminator both start from the 8B instruct checkpoint, each with rank-16 LoRA
adapters on a frozen bf16 base; critic-free group advantages. Memory: actor base 16 GB (it is also
the reference: adapters off) + discriminator base 16 GB + adapters (2 x 42M params) with their f32
Adam moments ~1 GB, plus rematerialised activations: ~35 GB of 128, where full fine-tuning with a
critic needed ~120 GB.

  python -m rlhb_jax.main --config configs/tpu_v5e_8_llama3_8b.py \
    --workdir gs://BUCKET/runs/llama3 \
    --config.model.path=/mnt/disks/ckpt/Meta-Llama-3-8B-Instruct --config.data.path=logs.jsonl
"""

from rlhb_jax import config as config_lib


def get_config():
  c = config_lib.default_configdict()
  c.mode = "rlhb"
  c.model.source = "hf"
  c.model.path = ""  # a Hugging Face directory (config.json + safetensors + tokenizer.json)
  c.model.dtype = "bfloat16"
  c.model.param_dtype = "bfloat16"
  c.model.remat = True
  c.compile.shape = "llama3-8b"  # mode=compile builds this architecture without the checkpoint
  c.compile.topology = "v5e:2x4"
  for spec in (c.lora, c.disc.lora, c.reward.lora):
    spec.rank = 16
    spec.alpha = 32.0
  c.disc.init_from_generator = True  # D's trunk: the generator's checkpoint, its own adapters
  c.mesh.shape = (1, 8, 1)  # pure FSDP
  c.sampling.max_new_tokens = 256
  c.sampling.temperature = 0.7
  c.sampling.prompt_buckets = (256, 384, 512, 768, 1024)
  c.sft.steps = 0
  c.disc.warmup_steps = 200
  c.disc.batch_size = 64
  c.ppo.advantage = "group"
  c.ppo.advantage_std = True
  c.ppo.reward_contrast = False
  c.ppo.reward_norm = "none"
  c.ppo.prompts_per_step = 32
  c.ppo.rollouts_per_prompt = 4
  c.ppo.epochs = 2
  c.ppo.minibatches = 4
  c.ppo.actor_optim.learning_rate = 1e-5  # adapters take larger steps than full weights
  c.disc.optim.learning_rate = 5e-5
  c.rlhb.steps = 1000
  c.checkpoint.every_steps = 50
  c.checkpoint.keep = 3
  return c
