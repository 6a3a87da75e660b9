"""Llama-3-8B-Instruct on a TPU v5e-8 slice (one host, 8 chips, 16 GiB HBM each).

Untested here (no TPU was available while writing it); sized by arithmetic, see docs/TPU.md. bf16
parameters and Adam moments, every layer rematerialised, FSDP over all 8 chips: actor 16 GB +
reference 16 + critic 16 + Adam (bf16) 64 + a 1B discriminator ~8 = ~120 GB of 128. That is tight;
`tpu_v4_32_llama3_8b.py` has room to spare.

  python -m rlhb_jax.main --config configs/tpu_v5e_8_llama3_8b.py \
    --workdir gs://BUCKET/runs/llama3 \
    --config.model.path=/mnt/disks/ckpt/Meta-Llama-3-8B-Instruct \
    --config.disc.model.path=/mnt/disks/ckpt/Llama-3.2-1B-Instruct --config.data.path=logs.jsonl
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
  c.disc.init_from_generator = False
  c.disc.model.source = "hf"
  c.disc.model.path = ""  # a smaller model of the same tokenizer family (e.g. Llama-3.2-1B)
  c.disc.model.dtype = "bfloat16"
  c.disc.model.param_dtype = "bfloat16"
  c.disc.model.remat = True
  c.mesh.shape = (1, 8, 1)  # pure FSDP
  c.sampling.max_new_tokens = 256
  c.sampling.prompt_buckets = (256, 512, 1024)
  c.sft.steps = 0
  c.disc.warmup_steps = 200
  c.disc.batch_size = 64
  c.ppo.prompts_per_step = 32
  c.ppo.rollouts_per_prompt = 4
  c.ppo.epochs = 2
  c.ppo.minibatches = 4
  c.ppo.actor_optim.learning_rate = 1e-6
  c.ppo.critic_optim.learning_rate = 5e-6
  c.disc.optim.learning_rate = 5e-6
  c.rlhb.steps = 1000
  c.checkpoint.every_steps = 50
  c.checkpoint.keep = 3
  return c
