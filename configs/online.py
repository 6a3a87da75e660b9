"""Online alignment on the tiny model: deploy -> collect -> train while the users drift.

  python -m rlhb_jax.main --config configs/online.py --workdir runs/online

The offline stages (simulated logs, BPE, tiny model, SFT, discriminator warm-up) are those of
configs/tiny.py; then `online.rounds` rounds serve the policy over HTTP on 127.0.0.1 (a free
port), let the simulator's users act on its answers, and train on what they did. From round
`sim.drift_round` on, the user mix moves from "hurried" users towards "friendly" ones (see
rlhb_jax/sim/config.py). Writes online_summary.json and plots/online_like_rate.png.
"""

from rlhb_jax import config as config_lib


def get_config():
  config = config_lib.default_configdict()
  config.mode = "online"
  config.behavior.sentence = "Users: {clauses}."
  config.sim.drift_round = 3
  config.online.rounds = 8
  config.online.queries_per_round = 256
  config.online.steps_per_round = 8
  config.online.window_rounds = 2
  return config
