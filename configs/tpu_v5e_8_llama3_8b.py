"""Llama-3-8B-Instruct on a TPU v5e-8 slice (one host, 8 chips, 16 GiB HBM each, 128 GiB in all).

Not run on a TPU yet; compiled for one (`--config.mode=compile`, docs/TPU.md): every step fits,
RLHB in 11.4 GiB a chip (71 % of HBM). Generator and discriminator both start from the 8B
instruct checkpoint, each with rank-16 LoRA adapters on a frozen bf16 base; critic-free group
advantages. Sized by the compiler: prompts up to 512 tokens, 16 prompts x 4 rollouts per RLHB
step and 16 warm-up triplets per step (at 1024-token prompts, 32 prompts and 64 triplets the
RLHB step needed 51 GiB of temporaries a chip and the warm-up 33 GiB).

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
  c.sampling.prompt_buckets = (128, 256, 384, 512)  # longer prompts are refused
  c.sft.steps = 0
  c.disc.warmup_steps = 200
  c.disc.batch_size = 16
  c.ppo.advantage = "group"
  c.ppo.advantage_std = True
  c.ppo.reward_contrast = False
  c.ppo.reward_norm = "none"
  c.ppo.prompts_per_step = 16
  c.ppo.rollouts_per_prompt = 4
  c.ppo.epochs = 2
  c.ppo.minibatches = 4
  c.ppo.actor_optim.learning_rate = 1e-5  # adapters take larger steps than full weights
  c.disc.optim.learning_rate = 5e-5
  c.rlhb.steps = 1000
  c.checkpoint.every_steps = 50
  c.checkpoint.keep = 3
  return c
