"""Method sections of the config: behavior-conditioned SFT, the discriminator, DPO and KTO."""

from __future__ import annotations

import dataclasses

from rlhb_jax.model.config import ModelSpec
from rlhb_jax.model.lora import LoraConfig
from rlhb_jax.training.config import OptimConfig


@dataclasses.dataclass(frozen=True)
class SFTConfig:
  steps: int = 700
  batch_size: int = 32
  optim: OptimConfig = OptimConfig(learning_rate=1e-3)


@dataclasses.dataclass(frozen=True)
class DiscConfig:
  """The behavior-conditioned discriminator (and its warm-up)."""

  model: ModelSpec = ModelSpec()  # its own size; tokenizer is shared with the generator
  lora: LoraConfig = LoraConfig()  # adapters on its trunk (warm-up and RLHB); rank 0 = full
  init_from_generator: bool = True  # start the trunk from the SFT generator's weights
  warmup_steps: int = 100
  batch_size: int = 32
  optim: OptimConfig = OptimConfig(learning_rate=5e-4)
  swap_fraction: float = 0.5  # share of negatives that are behavior-swapped real triplets
  # Of those swapped negatives, the share whose real response is paired with a neighbouring query
  # (under its own behavior text) instead of another behavior text: teaches D to check the
  # answer against the query and its search result (Batcher.mismatched).
  mismatch_fraction: float = 0.0
  bootstrap_ratio: float = 0.0  # rho: top-rewarded generated samples added as fakes (< 0.5)
  updates_per_step: int = 1  # G:D ratio = 1 : updates_per_step (0 freezes D)
  label_smoothing: float = 0.0

  def __post_init__(self):
    if not 0.0 <= self.bootstrap_ratio < 0.5:
      raise ValueError(
        f"config.disc.bootstrap_ratio={self.bootstrap_ratio}: must be in [0, 0.5); "
        "rho >= 0.5 collapses the discriminator (RLHB.md section 4)"
      )


@dataclasses.dataclass(frozen=True)
class DPOConfig:
  """mode=dpo: direct preference optimisation from the SFT generator (docs/RESULTS.md, "DPO and
  KTO")."""

  pairs: str = "behavior"  # behavior: pairs from the logs | annotators: reward.preferences pairs
  beta: float = 0.1
  steps: int = 60
  batch_size: int = 16  # pairs per step
  optim: OptimConfig = OptimConfig(learning_rate=1e-4)
  # Behavior pairs: two logged answers to one query (and search result) whose `rate_type` per
  # impression differs by at least `min_gap`, each shown at least `min_impressions` times.
  rate_type: str = "likes"
  min_gap: float = 0.2
  min_impressions: int = 10
  max_pairs_per_query: int = 4  # the widest gaps first
  heldout_fraction: float = 0.1  # pairs kept out of training for the held-out accuracy

  def __post_init__(self):
    if self.pairs not in ("behavior", "annotators"):
      raise ValueError(f"config.dpo.pairs={self.pairs!r}: expected behavior or annotators")


@dataclasses.dataclass(frozen=True)
class KTOConfig:
  """mode=kto: Kahneman-Tversky optimisation from the SFT generator on single logged answers."""

  beta: float = 0.1
  steps: int = 60
  batch_size: int = 32  # answers per step (and as many mismatched pairs for the KL estimate)
  optim: OptimConfig = OptimConfig(learning_rate=1e-4)
  desirable_weight: float = 1.0
  undesirable_weight: float = 1.0
  # Scale the rarer kind's weight so that w_D n_D = w_U n_U over the training answers (the paper
  # recommends w_D n_D / (w_U n_U) in [1, 4/3]); the weights above are then ignored.
  balance: bool = True
  # Desirable: the written behavior bins within `max_distance` (sum of |bin - bin*| over the
  # written types) of the most preferred ones; undesirable: as close to the least preferred.
  max_distance: int = 2
  min_impressions: int = 10
  heldout_fraction: float = 0.1
