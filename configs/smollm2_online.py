"""Online alignment on a model that reads: SmolLM2-135M-Instruct with LoRA, round after round.

  python -m rlhb_jax.main --config configs/smollm2_online.py --workdir runs/smollm2_online

The offline stages are those of configs/default.py (the demo: simulated logs, SFT 50 steps and the
discriminator warm-up 50 steps, each with rank-8 LoRA adapters on the pretrained instruct model,
training matmuls in bfloat16 summed in float32). Then `online.rounds` rounds serve the merged
generator over HTTP, let the simulator's users act on its answers (from round `sim.drift_round`
on, the user mix drifts), and train adapters on what they did: a few SFT steps on the answers
users liked, then RLHB steps with critic-free group advantages. Every round publishes the merged
generator to `models/online_actor` (hot-reloaded by a `mode=serve` process) and scores it against
the frozen starting policy on held-out queries. Sized for a 2-core CPU; raise
`online.queries_per_round` and `online.steps_per_round` on an accelerator.
"""

import pathlib

from rlhb_jax import config as config_lib


def get_config():
  c = config_lib.load_configdict(pathlib.Path(__file__).with_name("default.py"))
  c.mode = "online"
  c.sim.drift_round = 2
  c.online.rounds = 5
  c.online.queries_per_round = 48
  c.online.steps_per_round = 4
  c.online.sft_steps = 4
  c.online.sft_optim.learning_rate = 1e-4
  c.online.window_rounds = 2
  c.online.client_threads = 4
  # A round's 4 RLHB steps follow the users at the learning rate of results/real_model.json (the
  # demo's 3e-5 is for 20 actor steps in one go); the demo's D-only lead is an offline stage's.
  c.ppo.actor_optim.learning_rate = 1e-4
  c.rlhb.disc_lead_steps = 0
  return c
