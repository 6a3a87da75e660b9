"""PPO sections of the config: the PPO update, the RLHB stage and where the reward comes from."""

from __future__ import annotations

import dataclasses

from rlhb_jax.methods.ppo import advantages
from rlhb_jax.model.lora import LoraConfig
from rlhb_jax.training.config import OptimConfig


@dataclasses.dataclass(frozen=True)
class PPOConfig:
  rollouts_per_prompt: int = 4  # n responses per (query, behavior)
  prompts_per_step: int = 8
  epochs: int = 2
  minibatches: int = 2
  gamma: float = 1.0
  lam: float = 0.95
  # gae: GAE over a learned critic (built from the generator, trained with the value loss).
  # group: critic-free, each rollout's return minus the mean return of the other rollouts of its
  # prompt (RLOO; needs rollouts_per_prompt >= 2); no critic is built, stored or trained.
  advantage: str = "gae"
  advantage_std: bool = False  # group: divide by the std of the prompt's returns (GRPO)
  clip_eps: float = 0.2
  dual_clip: float = 0.0  # c > 1 enables dual clip; 0 = off
  value_clip: float = 0.2
  value_coef: float = 0.5
  entropy_coef: float = 0.0
  kl_coef: float = 0.05  # beta
  kl_estimator: str = "k1"  # k1 | k3
  adaptive_kl: bool = False
  kl_target: float = 6.0
  kl_horizon: int = 10000
  reward_transform: str = "prob"  # f(D): prob | log | logit
  # reward = f(D(q, r, target) - D(q, r, least preferred)) in logits: how much better the
  # response fits the target behavior than the opposite one. Artefacts that make any response look
  # generated cancel out; what remains is behavior consistency.
  reward_contrast: bool = True
  reward_norm: str = "group"  # none | center | whiten (batch) | group (per prompt's n rollouts)
  actor_optim: OptimConfig = OptimConfig(learning_rate=1e-4)
  critic_optim: OptimConfig = OptimConfig(learning_rate=3e-4)

  def __post_init__(self):
    if self.kl_estimator not in ("k1", "k3"):
      raise ValueError(f"config.ppo.kl_estimator={self.kl_estimator!r}: expected k1 or k3")
    if self.reward_transform not in ("prob", "log", "logit"):
      raise ValueError(f"config.ppo.reward_transform={self.reward_transform!r}")
    if self.reward_norm not in ("none", "center", "whiten", "group"):
      raise ValueError(f"config.ppo.reward_norm={self.reward_norm!r}")
    if not advantages.get(self.advantage).critic and self.rollouts_per_prompt < 2:
      raise ValueError(
        f"config.ppo.advantage={self.advantage} needs config.ppo.rollouts_per_prompt >= 2 "
        "(the baseline is the mean of the other rollouts of the same prompt)"
      )


@dataclasses.dataclass(frozen=True)
class RLHBConfig:
  steps: int = 60
  # The first `disc_lead_steps` of `steps` train only D (on the generator's own rollouts); the
  # actor's learning rate is 0 until then, so it follows a discriminator that has seen its answers.
  disc_lead_steps: int = 0
  target_behavior: str = "best"  # best: the most preferred behavior | batch: the logged one
  max_nonfinite_in_row: int = 5  # K skipped updates in a row stop the run
  collapse_high: float = 0.95  # mean D(fake) above this ...
  collapse_low: float = 0.05  # ... or below this ...
  collapse_patience: int = 20  # ... for this many steps raises the collapse alarm

  def __post_init__(self):
    if not 0 <= self.disc_lead_steps < max(self.steps, 1):
      raise ValueError(
        f"config.rlhb.disc_lead_steps={self.disc_lead_steps}: must be in [0, rlhb.steps="
        f"{self.steps})"
      )


@dataclasses.dataclass(frozen=True)
class RewardConfig:
  """Where the generator's PPO reward comes from, and the baselines' reward models (docs/RESULTS.md,
  "The paper's comparison")."""

  # disc: RLHB (the behavior-conditioned discriminator) | rm: RLHF (a Bradley-Terry reward model on
  # pairwise preferences) | classifier: RLHBC (per-behavior bin classifiers, combined by the formula
  # below) | disc+rm: f(D) + rm_weight * RM | sim: the simulated users' expected like rate of each
  # response (ground truth, simulator logs only): the ceiling any learned reward could reach.
  source: str = "disc"
  rm_weight: float = 1.0
  # Pairwise preferences {"query", "chosen", "rejected"} JSONL; "" = the simulator's annotators.
  preferences_path: str = ""
  rm_steps: int = 300
  rm_batch_size: int = 32
  rm_optim: OptimConfig = OptimConfig(learning_rate=3e-4)
  lora: LoraConfig = LoraConfig()  # adapters on the RM's / classifier's trunk; rank 0 = full
  rm_heldout_fraction: float = 0.1  # pairs kept out of training to report held-out accuracy
  classifier_steps: int = 300
  classifier_batch_size: int = 32
  classifier_optim: OptimConfig = OptimConfig(learning_rate=3e-4)
  # RLHBC reward = sum(w * E[count]) / sum(v * E[count]) over behavior types, E[count] per
  # impression from the classifier's bin probabilities (bin midpoints mapped back through
  # log1p and the rate scale). Default: (likes - dislikes) / (impressions + clicks).
  numerator: tuple[tuple[str, float], ...] = (("likes", 1.0), ("dislikes", -1.0))
  denominator: tuple[tuple[str, float], ...] = (("impressions", 1.0), ("clicks", 1.0))
