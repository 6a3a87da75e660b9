"""What XLA says about a compiled step: bytes per device, FLOPs, and the collectives in its HLO.

`step_stats(compiled)` reads three things the compiler reports for one executable, per device:
  memory   `Compiled.memory_analysis()`: arguments, outputs, the outputs that alias donated
           arguments, temporaries (the peak of XLA's buffer assignment) and generated code;
  cost     `Compiled.cost_analysis()`: FLOPs and bytes accessed (HBM traffic);
  HLO      `Compiled.as_text()`, the optimized module: every all-gather, reduce-scatter, all-reduce,
           all-to-all and collective-permute, with the bytes of its result.
XLA's cost analysis counts a loop body once, however often it runs (checked: a 10-step scan of a
matmul reports the FLOPs of one). The steps loop over layers, decoded tokens and minibatches, so
collectives are counted here through the loops (each computation of the optimized HLO weighted by
the trip counts of the loops around it; on a TPU the FSDP all-gathers of big matmuls become
loops of collective-permutes, "collective matmuls") and FLOPs come from the step's jaxpr (every
dot_general, scans times their length, rematerialised forwards included). The cost analysis's
own figures are kept beside them (`xla_*`).
`Chip` holds the published peak figures a prediction divides by (Google Cloud TPU docs, "TPU
v5e" and "TPU v4" system architecture pages).
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections import defaultdict
from typing import Any

COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4}
_BYTES |= {"f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}
_ARRAY = re.compile(r"\b([a-z]+[0-9]*(?:e[0-9]m[0-9]\w*)?)\[([0-9,]*)\]")
_OP = re.compile(r"=\s*(?P<type>.*?)\s(?P<op>" + "|".join(COLLECTIVES) + r")(?P<start>-start)?\(")
_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?(?P<name>[\w.\-]+)\s.*\{\s*$")
_CALLEE = re.compile(
  r"\b(?:body|condition|calls|to_apply|true_computation|false_computation)=%?([\w.\-]+)"
)
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_CONSTANT = re.compile(r"%([\w.\-]+)\s*=\s*[su](?:8|16|32|64)\[\][^ ]*\s+constant\((\d+)\)")
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"')


@dataclasses.dataclass(frozen=True)
class Chip:
  name: str
  peak_flops: float  # bf16 FLOP/s of one chip
  hbm_bytes: int
  hbm_bytes_per_s: float


# Keyed by `device.device_kind`. Source: cloud.google.com/tpu/docs/v5e and .../v4.
CHIPS = {
  "TPU v5 lite": Chip("v5e", 197e12, 16 * 2**30, 819e9),
  "TPU v4": Chip("v4", 275e12, 32 * 2**30, 1200e9),
}


def _array_bytes(type_str: str) -> list[int]:
  """The byte sizes of the arrays in an HLO type (`bf16[8,128]{1,0}` or a tuple of them)."""
  out = []
  for dtype, dims in _ARRAY.findall(type_str):
    if dtype in _BYTES or dtype.startswith("f8"):
      size = math.prod(int(d) for d in dims.split(",") if d) if dims else 1
      out.append(size * _BYTES.get(dtype, 1))
  return out


def _result_bytes(op: str, start: bool, type_str: str) -> int:
  """Bytes of a collective's result. An async all-gather or collective-permute start returns
  (operands, results[, sync flags]): its results are the second half of the arrays."""
  sizes = _array_bytes(type_str)
  if start and op in ("all-gather", "collective-permute"):
    arrays = [s for s in sizes if s > 4] or sizes  # drop the u32[] flags
    return sum(arrays[len(arrays) // 2 :])
  return sum(sizes)


def _blocks(lines: list[str]) -> list[tuple[str, list[str]]]:
  """(name, lines) of each computation of an HLO module, in the order printed (ENTRY last)."""
  blocks: list[tuple[str, list[str]]] = []
  for line in lines:
    m = _COMPUTATION.match(line)
    if m and not line[:1].isspace():
      blocks.append((m.group("name"), []))
    elif blocks:
      blocks[-1][1].append(line)
  return blocks


def _trip_count(line: str, blocks: dict[str, list[str]]) -> int:
  """Iterations of a while loop: XLA's known_trip_count, else the bound N of its condition
  `i < N` on a constant (a scan's counter starts at 0), else 1."""
  if m := _TRIP.search(line):
    return int(m.group(1))
  cond = re.search(r"condition=%?([\w.\-]+)", line)
  body = blocks.get(cond.group(1), []) if cond else []
  consts = dict(_CONSTANT.findall("\n".join(body)))
  for b in body:
    if "compare(" in b and "direction=LT" in b:
      for operand in re.findall(r"%([\w.\-]+)", b.split("compare(", 1)[1].split(")")[0]):
        if operand in consts:
          return int(consts[operand])
  return 1


def _multiplicities(lines: list[str]) -> dict[str, int]:
  """How many times each computation of an HLO module runs per call of its entry: a while body
  runs its trip count per run of the computation holding the loop."""
  blocks = _blocks(lines)
  by_name = dict(blocks)
  mult: dict[str, int] = defaultdict(int)
  if not blocks:
    return mult
  mult[blocks[-1][0]] = 1  # callees are printed before their callers; ENTRY comes last
  for name, body in reversed(blocks):
    for line in body:
      callees = _CALLEE.findall(line)
      for branch in _BRANCHES.findall(line):
        callees += [c.strip().lstrip("%") for c in branch.split(",")]
      trip = _trip_count(line, by_name) if " while(" in line else 1
      for callee in callees:
        loop = f"body={callee}" in line.replace("%", "")
        mult[callee] += mult[name] * (trip if loop else 1)
  return mult


def collectives(hlo: str) -> dict[str, dict[str, int]]:
  """{op: {"count", "bytes"}} of the collectives in an optimized HLO module, per step and device
  (loops counted by their trip counts), plus "static_count": the ops as written."""
  lines = hlo.splitlines()
  mult = _multiplicities(lines)
  out = {op: {"count": 0, "bytes": 0, "static_count": 0} for op in COLLECTIVES}
  current = None
  for line in lines:
    m = _COMPUTATION.match(line)
    if m and not line[:1].isspace():
      current = m.group("name")
      continue
    op = _OP.search(line)
    if op is None or "-done" in line.split("=")[0]:
      continue
    n = max(mult.get(current, 1), 1)
    entry = out[op.group("op")]
    entry["static_count"] += 1
    entry["count"] += n
    entry["bytes"] += n * _result_bytes(op.group("op"), bool(op.group("start")), op.group("type"))
  return out


def jaxpr_flops(jaxpr: Any) -> float:
  """Matmul FLOPs of a (closed) jaxpr: 2 x output size x contracted size of every dot_general,
  a scan's body times its length, the larger branch of a cond, a while body once."""
  jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
  total = 0.0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == "dot_general":
      (contract, _), _ = eqn.params["dimension_numbers"]
      lhs = eqn.invars[0].aval.shape
      out = eqn.outvars[0].aval.shape
      total += 2.0 * math.prod(out) * math.prod(lhs[d] for d in contract)
    elif name == "scan":
      total += eqn.params["length"] * jaxpr_flops(eqn.params["jaxpr"])
    elif name == "cond":
      total += max(jaxpr_flops(b) for b in eqn.params["branches"])
    else:
      for value in eqn.params.values():
        if hasattr(value, "eqns") or hasattr(getattr(value, "jaxpr", None), "eqns"):
          total += jaxpr_flops(value)
  return total


def step_stats(
  traced: Any, compiled: Any, devices: int, chip: Chip | None, mfu: float
) -> dict[str, Any]:
  """Memory, FLOPs, HBM bytes, collectives and a predicted time of one step, per device, from
  its `jax.stages.Traced` (for the jaxpr) and `Compiled`.

  predicted_s = max(FLOPs / (peak x mfu), argument bytes / HBM bandwidth): the compute time at
  the stated model-FLOPs utilisation, or the time to read every argument (weights, state, cache)
  once, whichever is longer; a decode step is bound by the second."""
  mem = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list | tuple) else cost
  hlo = compiled.as_text()
  out: dict[str, Any] = {
    "argument_bytes": int(mem.argument_size_in_bytes),
    "output_bytes": int(mem.output_size_in_bytes),
    "alias_bytes": int(mem.alias_size_in_bytes),
    "temp_bytes": int(mem.temp_size_in_bytes),
    "code_bytes": int(mem.generated_code_size_in_bytes),
    # The jaxpr is the whole step on all `devices`: an even share each, as MFU counts.
    "flops": jaxpr_flops(traced.jaxpr) / devices,
    "xla_flops": float(cost.get("flops", 0.0)),
    "xla_bytes_accessed": float(cost.get("bytes accessed", 0.0)),
    "collectives": collectives(hlo),
  }
  # Donated arguments are reused for the outputs they alias: counted once.
  out["total_bytes"] = (
    out["argument_bytes"]
    + out["output_bytes"]
    - out["alias_bytes"]
    + out["temp_bytes"]
    + out["code_bytes"]
  )
  if chip is not None:
    out["hbm_share"] = out["total_bytes"] / chip.hbm_bytes
    compute = out["flops"] / (chip.peak_flops * mfu)
    memory = out["argument_bytes"] / chip.hbm_bytes_per_s
    out["predicted_s"] = max(compute, memory)
    out["bound"] = "compute" if compute >= memory else "memory"
  return out
