"""Infrastructure sections of the config: the device mesh, several processes, checkpoints."""

from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  shape: tuple[int, ...] = (-1, 1, 1)  # (data, fsdp, tensor); -1 = all remaining devices
  # Logical axis -> mesh axis (or None). FSDP vs. tensor parallel is a change here only.
  rules: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("layers", None),
    ("out", None),
    ("lora", None),
  )


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
  """Several JAX processes (multi-host). `enabled` alone calls jax.distributed.initialize(), which
  finds the cluster on TPU pods and under SLURM; `coordinator` (host:port), `num_processes` and
  `process_id` name it explicitly elsewhere (`python -m rlhb_jax.infra.launch` sets them)."""

  enabled: bool = False
  coordinator: str = ""
  num_processes: int = 0
  process_id: int = -1

  def __post_init__(self):
    if self.coordinator and (
      self.num_processes < 1 or not 0 <= self.process_id < self.num_processes
    ):
      raise ValueError(
        f"config.distributed.coordinator={self.coordinator!r} needs num_processes >= 1 and "
        f"0 <= process_id < num_processes (got {self.num_processes}, {self.process_id})"
      )


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
  every_steps: int = 20
  keep: int = 2
  async_save: bool = True
  # XLA's persistent compilation cache: a second run (or a resumed one) loads each stage's compiled
  # step instead of compiling it again. Entries are keyed by the computation's HLO, the compile
  # options and the jax/jaxlib versions, so changed code compiles afresh. "" turns it off.
  compile_cache: str = "~/.cache/rlhb_jax/xla"
