"""The demo (configs/default.py) in float32 at the budgets of
results/real_model_citations_any.json (SFT 120 steps, D warm-up 120, RLHB 40; about 45 minutes a
seed on 2 CPU cores); its users are those of `--config.sim.citations=any`.

  python -m rlhb_jax.main --config configs/smollm2_sim.py --workdir runs/smollm2_sim

simulate -> behavior-conditioned SFT -> discriminator warm-up -> RLHB -> evaluation, like the
default demo, but the generator, the discriminator (and, for the baselines, the RLHF reward model
and the behavior classifier) all start from the pretrained instruct model, each with LoRA adapters
of its own on a frozen base and its own head. Every stage merges its adapters into the weights it
saves, so the next stage starts from a plain model: the RLHB reference is the SFT model (the
actor's base, adapters off), and D's base is its warmed-up trunk.

Choices (docs/RESULTS.md, "RLHB on a model that reads"):
- Prompts: SmolLM2's chat template with a 3-token system message ("Answer briefly.", 13 tokens
  fewer per row than its ~20-token default), a short behavior sentence, the question and the
  search result it was shown with.
- Critic-free group advantages (n = 8 rollouts per prompt, RLOO baseline scaled by the group's
  std): no value model as large as the actor.
- Reward: f(D(query, response, most preferred behavior)) alone; the contrastive reward
  D(best) - D(least preferred) ranked answers worse than a random pick (issue #11's probe).
- Exploration: 2 prompts x 8 rollouts per step at temperature 1.0. The SFT policy's greedy answer
  is already the best of its own samples at 4 rollouts and T = 0.7 (PPO on the simulator's own
  reward did not move it in 40 steps); with 8 rollouts at T = 1.0 RLHB finds the answers with a
  cited source that the "thorough" users like and that the discriminator, trained against the
  generator's bare answers, comes to reward (docs/RESULTS.md, "RLHB on a model that reads"; on the
  earlier users, who rewarded any citation, `sim.citations=any`).
"""

import pathlib

from rlhb_jax import config as config_lib


def get_config():
  c = config_lib.load_configdict(pathlib.Path(__file__).with_name("default.py"))
  c.model.matmul_dtype = ""
  c.sft.steps = 120
  c.disc.warmup_steps = 120
  c.rlhb.steps = 40
  c.rlhb.disc_lead_steps = 0  # the demo's D-only lead and lower actor lr came later (issue #23)
  c.ppo.actor_optim.learning_rate = 1e-4
  return c
