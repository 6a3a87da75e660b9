"""Training sections of the config: optimizers and logging (checkpoints: infra/config.py)."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  learning_rate: float = 3e-4
  warmup_steps: int = 10
  delay_steps: int = 0  # updates at learning rate 0 before the warm-up (the moments still fill)
  weight_decay: float = 0.0
  max_grad_norm: float = 1.0
  b1: float = 0.9
  b2: float = 0.95


@dataclasses.dataclass(frozen=True)
class LogConfig:
  every_steps: int = 1
  tensorboard: bool = True
  progress: bool = True
  plots: bool = True
