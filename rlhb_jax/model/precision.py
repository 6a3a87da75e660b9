"""`model.matmul_dtype="auto"`: bfloat16 matmul operands where the hardware multiplies them.

Training matmuls with bfloat16 operands summed in float32 run at about twice float32's speed on
accelerators and on x86 CPUs with AMX-BF16 or AVX-512 BF16; on a CPU without them XLA widens every
operand and the same matmul runs at half float32's speed (docs/PERFORMANCE.md, 2026-12-07). "auto"
picks per machine at start-up, once, and the run's config.json keeps "auto".
"""

from __future__ import annotations

import functools
import pathlib

import jax

_BF16_FLAGS = ("amx_bf16", "avx512_bf16")


def cpu_flags() -> frozenset[str]:
  """The x86 feature flags of this host's first core (empty where /proc/cpuinfo is absent)."""
  try:
    info = pathlib.Path("/proc/cpuinfo").read_text()
  except OSError:
    return frozenset()
  line = next((x for x in info.splitlines() if x.startswith("flags")), "")
  return frozenset(line.partition(":")[2].split())


@functools.cache
def native_bf16() -> bool:
  """Whether the default backend multiplies bfloat16 operands natively: accelerators do; a CPU
  does with AMX-BF16 or AVX-512 BF16."""
  if jax.default_backend() != "cpu":
    return True
  return any(f in cpu_flags() for f in _BF16_FLAGS)


def matmul_dtype(name: str) -> str:
  """`ModelSpec.matmul_dtype` resolved: "auto" is "bfloat16" where `native_bf16()`, else "" (the
  activations' dtype); any other value is returned as it is."""
  if name != "auto":
    return name
  return "bfloat16" if native_bf16() else ""
