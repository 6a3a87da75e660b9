"""Evaluation section of the config."""

from __future__ import annotations

import dataclasses

from rlhb_jax.model.config import ModelSpec


@dataclasses.dataclass(frozen=True)
class EvalConfig:
  num_queries: int = 200  # held-out simulator queries (0: every one)
  batch_size: int = 50
  # Who decides Win / Tie / Loss: "sim" (the simulated users' ground truth) or "llm" (judge_model
  # asked both orders, inconsistent verdicts are ties; docs/JUDGES.md).
  judge: str = "sim"
  judge_model: ModelSpec = ModelSpec(source="smollm2-135m-instruct")
  # Every this many PPO steps, score the generator on `curve_queries` held-out queries (win rate vs.
  # SFT, like rate) and log it as eval_* metrics: the win-rate-over-training curves. 0 = off.
  curve_every: int = 0
  curve_queries: int = 48
  # The pipeline's behavior knob: the RLHB generator's answers under the most preferred, the least
  # preferred and a mixed behavior sentence (eval/showcase.py), three more greedy evaluations.
  knob: bool = True

  def __post_init__(self):
    if self.num_queries < 0:
      raise ValueError(f"config.eval.num_queries={self.num_queries}: expected >= 0 (0: every one)")
    if self.judge not in ("sim", "llm"):
      raise ValueError(f"config.eval.judge={self.judge!r}: expected sim or llm")
