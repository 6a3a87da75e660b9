"""mode=compile: every jitted step of a config's stages, compiled ahead of time for a described
device topology from abstract shapes (no weights, no data, no accelerator attached).

  python -m rlhb_jax.main --config configs/tpu_v5e_8_llama3_8b.py --workdir runs/aot \\
    --config.mode=compile --config.compile.topology=v5e:2x4

A TPU topology ("v5e:2x4", "v4:2x2x4") is compiled by the TPU compiler that libtpu brings
(`jax.experimental.topologies`); "cpu:N" compiles for N local CPU devices (memory only). Each
step's state is what the run itself builds (`trainable.prepare`, `ppo_state.init_state`) traced
under `jax.eval_shape`, so its shapes, dtypes and NamedShardings are the run's and nothing is
allocated; batches are `jax.ShapeDtypeStruct`s of the batcher's fields at the longest prompt
bucket (`compile.prompt_len`). A mode rather than a script in experiments/: the same config file,
flags, mesh and rules table as the run it checks, and a typo in a flag is an error here too.

Steps: sft, disc_warmup, rlhb (rollout, reward, PPO and D updates: one program), kto, and the
sampler's prefill and one decode step (`sampling.sample` over the plain generator, its layer
scan). Prints per step the bytes per device, share of HBM, FLOPs, collectives and a predicted
time (`infra/compiled.py`), and writes them to WORKDIR/compile.json.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import pathlib
import time
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from rlhb_jax import config as config_lib
from rlhb_jax.config import Config
from rlhb_jax.infra import compiled as compiled_lib
from rlhb_jax.infra import sharding
from rlhb_jax.infra.report import format_table
from rlhb_jax.jobs.config import COMPILE_STEPS
from rlhb_jax.methods import disc, kto, sft
from rlhb_jax.methods.ppo import advantages, rewards
from rlhb_jax.methods.ppo import state as ppo_state
from rlhb_jax.methods.ppo import step as ppo_step
from rlhb_jax.model import build as build_lib
from rlhb_jax.model.llama import Cache, LlamaConfig, Transformer, positions_from_mask
from rlhb_jax.model.shapes import SHAPES
from rlhb_jax.training import optim, trainable

log = logging.getLogger(__name__)
_BUILT_IN = {"smollm2-135m-instruct": "smollm2-135m"}  # model.source -> its SHAPES preset


def topology_devices(name: str) -> list:
  """The devices of a described topology: "cpu:N" (local CPU devices) or a TPU slice."""
  if name.startswith("cpu:"):
    return jax.devices("cpu")[: int(name[4:])]
  from jax.experimental import topologies

  return list(topologies.get_topology_desc(name, "tpu").devices)


def model_shape(cfg: Config) -> LlamaConfig:
  """The generator's architecture without its weights, with the config's dtypes and remat."""
  spec = cfg.model
  if spec.source == "tiny":
    return build_lib.tiny_llama_config(spec, spec.vocab_size)
  preset = cfg.compile.shape or _BUILT_IN.get(spec.source, "")
  if preset not in SHAPES:
    raise ValueError(
      f"config.compile.shape={preset!r}: name the architecture of model.source={spec.source!r} "
      f"(one of {sorted(SHAPES)})"
    )
  fields = ("dtype", "param_dtype", "matmul_dtype", "remat")
  return dataclasses.replace(SHAPES[preset], **{f: getattr(spec, f) for f in fields})


def on_accelerator(cfg: Config) -> Config:
  """`cfg` as it runs on an accelerator: the sampler's "auto" settings resolve by the backend,
  which here is the host's CPU (also for "cpu:N", which stands in for a GPU's memory), so they
  are set to what they pick on a TPU or GPU (the layer scan, the model's dtypes)."""
  s = cfg.sampling
  layers = "scan" if s.decode_layers == "auto" else s.decode_layers
  dtype = "model" if s.dtype == "auto" else s.dtype
  return config_lib.replace(cfg, **{"sampling.decode_layers": layers, "sampling.dtype": dtype})


def _with_shardings(shapes: Any, shardings: Any) -> Any:
  return jax.tree.map(
    lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, shardings
  )


def _traced(init) -> tuple[Any, Any, Any]:
  """`init() -> (state, its shardings, static extra)` traced under `jax.eval_shape`: the state's
  ShapeDtypeStructs carrying their shardings, the shardings, and the extra (graph definitions)."""
  box = {}

  def run():
    state, shardings, extra = init()
    box["sh"], box["extra"] = shardings, extra
    return state

  shapes = jax.eval_shape(run)
  return _with_shardings(shapes, box["sh"]), box["sh"], box["extra"]


def _fields(**parts: tuple[int, int]) -> dict:
  """{name: int32 (rows, length), name_mask: bool (rows, length)} for each named part."""
  out = {}
  for name, (rows, length) in parts.items():
    out[name] = jax.ShapeDtypeStruct((rows, length), jnp.int32)
    out[f"{name}_mask"] = jax.ShapeDtypeStruct((rows, length), jnp.bool_)
  return out


def batches(cfg: Config, P: int, Pd: int) -> dict[str, dict]:
  """Each stage's batch fields as the batchers make them (`data/batches.py`, `methods/kto.py`)."""
  Tn, B = cfg.sampling.max_new_tokens, cfg.ppo.prompts_per_step
  Bd = cfg.disc.batch_size
  disc_rows = dict(real_prefix=(Bd, Pd), swap_prefix=(Bd, Pd), real=(Bd, Tn))
  rlhb = _fields(
    prompt=(B, P), prefix=(B, Pd), contrast_prefix=(B, Pd), real_prefix=(B, Pd)
  ) | _fields(swap_prefix=(B, Pd), real=(B, Tn))
  extras = rewards.get(cfg.reward.source).batch_fields
  if "query_index" in extras:
    rlhb["query_index"] = jax.ShapeDtypeStruct((B,), jnp.int32)
  if "rm_prefix" in extras:
    rlhb |= _fields(rm_prefix=(B, Pd))
  Bk = cfg.kto.batch_size
  return {
    "sft": _fields(prompt=(cfg.sft.batch_size, P), response=(cfg.sft.batch_size, Tn)),
    "disc_warmup": _fields(**disc_rows),
    "rlhb": rlhb,
    "kto": _fields(prompt=(Bk, P), response=(Bk, Tn))
    | {"desirable": jax.ShapeDtypeStruct((Bk,), jnp.float32)},
  }


def _rng(mesh) -> jax.ShapeDtypeStruct:
  key = jax.eval_shape(lambda: jax.random.key(0))
  return jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=sharding.replicated(mesh))


def _lower_step(mesh, init, compile_fn, batch: dict):
  """Traces `compile_fn(static, state_sh, batch_sh)` on the abstract state, batch and key."""
  state, state_sh, static = _traced(init)
  batch_sh = trainable.batch_shardings(batch, mesh)
  step = compile_fn(static, state_sh, batch_sh)
  return step.trace(state, _with_shardings(batch, batch_sh), _rng(mesh))


def _supervised(cfg: Config, mesh, make_model, spec, optim_cfg, steps: int, compile_fn, batch, ref):
  tx = optim.make_optimizer(optim_cfg, max(steps, 1))

  def init():
    p = trainable.prepare(make_model(), spec, cfg.seed, mesh, cfg.mesh.rules, tx)
    state, state_sh = trainable.supervised(p, ref)
    return state, state_sh, p.graphdef

  rep = sharding.replicated(mesh)
  return _lower_step(mesh, init, lambda g, s, b: compile_fn(g, tx, (s, b, rep)), batch)


def _rlhb(cfg: Config, mesh, make_actor, vocab: int, batch):
  if rewards.get(cfg.reward.source).frozen is not None:
    raise ValueError(f"mode=compile: reward.source={cfg.reward.source} reads a frozen scorer")

  def init():
    actor = make_actor()
    critic = None
    if advantages.get(cfg.ppo.advantage).critic:
      critic = build_lib.scalar_from_lm(actor, 1, cfg.seed + 1)
    d = build_lib.build_disc(cfg, actor, vocab)
    roles, state, state_sh = ppo_state.init_state(
      cfg, actor, critic, d, (1,), 0, mesh, lora_specs=True
    )
    return state, state_sh, roles

  return _lower_step(
    mesh, init, lambda roles, s, b: ppo_step.compile_train_step(roles, cfg, s, b, mesh), batch
  )


def _sampler(cfg: Config, mesh, lcfg: LlamaConfig, P: int) -> dict:
  """Traced prefill and one decode step of the sampler on the plain generator: `sample`'s two
  halves (model/sampling.py), B = prompts x rollouts rows, a cache of P + max_new_tokens."""
  rows = cfg.ppo.prompts_per_step * cfg.ppo.rollouts_per_prompt
  S = P + cfg.sampling.max_new_tokens
  dtype = None if cfg.sampling.dtype == "model" else cfg.sampling.dtype
  rules = cfg.mesh.rules

  def init():
    model = Transformer(lcfg, rngs=nnx.Rngs(0))
    params = build_lib.params_of(model)
    sh = sharding.param_shardings(params, sharding.logical_axes(model), mesh, rules)
    return params, sh, nnx.graphdef(model)

  params, params_sh, graphdef = _traced(init)
  kv_axes = ("layers", "batch", "length", "kv_heads", "head_dim")
  kv_shape = (lcfg.num_layers, rows, S, lcfg.num_kv_heads, lcfg.head_dim)
  kv = sharding.NamedSharding(mesh, sharding.logical_to_spec(kv_axes, rules, kv_shape, mesh))
  rows_sh = sharding.batch_sharding(mesh, 2, rows)
  rep = sharding.replicated(mesh)
  cache_sh = Cache(kv, kv, rows_sh, rep)
  cache = _with_shardings(jax.eval_shape(lambda: Cache.zeros(lcfg, rows, S, dtype)), cache_sh)

  def prefill(params, tokens, mask):
    model = nnx.merge(graphdef, params)
    c = Cache.zeros(model.cfg, rows, S, dtype)
    h, c = model.trunk(tokens, positions_from_mask(mask), mask, c, dtype=dtype)
    return model.logits(h[:, -1:], dtype)[:, 0], c

  def decode(params, token, pos, live, c):
    model = nnx.merge(graphdef, params)
    h, c = model.trunk(token[:, None], pos[:, None], live[:, None], c, dtype=dtype)
    return model.logits(h, dtype)[:, 0], c

  col = sharding.batch_sharding(mesh, 1, rows)
  logits_sh = sharding.batch_sharding(mesh, 2, rows)
  tokens = _with_shardings(_fields(t=(rows, P)), {"t": rows_sh, "t_mask": rows_sh})
  one = lambda dt: jax.ShapeDtypeStruct((rows,), dt, sharding=col)
  jit = functools.partial(jax.jit, out_shardings=(logits_sh, cache_sh))
  return {
    "prefill": jit(prefill).trace(params, tokens["t"], tokens["t_mask"]),
    "decode": jit(decode, donate_argnums=(4,)).trace(
      params, one(jnp.int32), one(jnp.int32), one(jnp.bool_), cache
    ),
  }


def traced_steps(cfg: Config, mesh, steps=COMPILE_STEPS) -> dict[str, Any]:
  """{step: jax.stages.Traced} of the named steps of `cfg` on `mesh` (abstract inputs only)."""
  lcfg = model_shape(cfg)
  P = cfg.compile.prompt_len or max(cfg.sampling.prompt_buckets)
  data = batches(cfg, P, P)
  make_actor = lambda: Transformer(lcfg, rngs=nnx.Rngs(cfg.seed))
  make_disc = lambda: build_lib.build_disc(cfg, make_actor(), lcfg.vocab_size)
  total = cfg.rlhb.steps * cfg.ppo.epochs * cfg.ppo.minibatches
  build = {
    "sft": lambda: _supervised(
      cfg, mesh, make_actor, cfg.lora, cfg.sft.optim, cfg.sft.steps, sft.compile_sft,
      data["sft"], False,
    ),
    "disc_warmup": lambda: _supervised(
      cfg, mesh, make_disc, cfg.disc.lora, cfg.disc.optim, cfg.disc.warmup_steps,
      lambda g, tx, sh: disc.compile_disc_warmup(g, tx, cfg, sh), data["disc_warmup"], False,
    ),
    "rlhb": lambda: _rlhb(cfg, mesh, make_actor, lcfg.vocab_size, data["rlhb"]),
    "kto": lambda: _supervised(
      cfg, mesh, make_actor, cfg.lora, cfg.kto.optim, max(cfg.kto.steps, total),
      lambda g, tx, sh: kto.compile_kto(g, tx, cfg, sh), data["kto"], True,
    ),
  }  # fmt: skip
  out = {}
  with jax.set_mesh(mesh):
    for name in steps:
      if name in ("prefill", "decode"):
        out |= {k: v for k, v in _sampler(cfg, mesh, lcfg, P).items() if k == name}
      else:
        out[name] = build[name]()
  return out


_COLUMNS = ("step", "args", "out", "alias", "temp", "code", "total GiB", "HBM", "TFLOP")
_COLUMNS += ("XLA GB accessed", "predicted", "collectives (per step)")


def _row(name: str, s: dict, chip) -> dict:
  gib = lambda b: f"{b / 2**30:.2f}"
  coll = ", ".join(
    f"{op} {c['count']} x / {c['bytes'] / 2**30:.2f} GiB"
    for op, c in s["collectives"].items()
    if c["count"]
  )
  return {
    "step": name,
    "args": gib(s["argument_bytes"]),
    "out": gib(s["output_bytes"]),
    "alias": gib(s["alias_bytes"]),
    "temp": gib(s["temp_bytes"]),
    "code": gib(s["code_bytes"]),
    "total GiB": gib(s["total_bytes"]),
    "HBM": f"{100 * s['hbm_share']:.0f} %" if chip else "-",
    "TFLOP": f"{s['flops'] / 1e12:.2f}",
    "XLA GB accessed": f"{s['xla_bytes_accessed'] / 1e9:.1f}",
    "predicted": f"{s['predicted_s']:.3f} s ({s['bound']})" if chip else "-",
    "collectives (per step)": coll or "none",
  }


def run(cfg: Config, workdir: pathlib.Path) -> dict:
  cc = cfg.compile
  if not cc.topology:
    raise ValueError("config.compile.topology: name one, e.g. v5e:2x4, v4:2x2x4 or cpu:8")
  # A persistent cache (config.checkpoint.compile_cache) cannot load executables of a topology
  # with no client behind it: compile afresh.
  jax.config.update("jax_enable_compilation_cache", False)
  devices = topology_devices(cc.topology)
  chip = compiled_lib.CHIPS.get(devices[0].device_kind)
  cfg = on_accelerator(cfg)
  mesh = sharding.make_mesh(cfg.mesh, devices)
  kind = devices[0].device_kind
  print(f"compile: {len(devices)} x {kind} ({cc.topology}), mesh {dict(mesh.shape)}", flush=True)
  results, rows = {}, []
  for name, traced in traced_steps(cfg, mesh, cc.steps).items():
    t0 = time.perf_counter()
    try:
      exe = traced.lower().compile()
    except jax.errors.JaxRuntimeError as e:  # the TPU compiler refuses what does not fit in HBM
      if "RESOURCE_EXHAUSTED" not in str(e):
        raise
      results[name] = {"fits": False, "error": str(e).strip().splitlines()[0]}
      rows.append({"step": name, "HBM": "does not fit", "collectives (per step)": str(e)[:160]})
      print(f"{name}: {results[name]['error']}", flush=True)
      continue
    stats = compiled_lib.step_stats(traced, exe, len(devices), chip, cc.mfu)
    stats["compile_s"] = time.perf_counter() - t0
    results[name] = stats | {"fits": True}
    rows.append(_row(name, stats, chip))
    print(format_table(rows[-1:], list(rows[-1])), f"(compiled in {stats['compile_s']:.0f} s)")
  versions = {"jax": jax.__version__, "libtpu": _libtpu_version()}
  report = {
    "topology": cc.topology,
    "device_kind": kind,
    "devices": len(devices),
    "mesh": dict(mesh.shape),
    "chip": dataclasses.asdict(chip) if chip else None,
    "mfu": cc.mfu,
    "prompt_len": cc.prompt_len or max(cfg.sampling.prompt_buckets),
    "date": time.strftime("%Y-%m-%d"),
    "versions": versions,
    "steps": results,
  }
  if jax.process_index() == 0:
    (workdir / "compile.json").write_text(json.dumps(report, indent=2))
  print(format_table(rows, _COLUMNS))
  note = f"at {cc.mfu:.0%} MFU of {chip.peak_flops / 1e12:.0f} TFLOP/s" if chip else ""
  print(f"bytes per device; {note}; jax {versions['jax']}, libtpu {versions['libtpu']}")
  return report


def _libtpu_version() -> str:
  from importlib import metadata

  try:
    return metadata.version("libtpu")
  except metadata.PackageNotFoundError:
    return "absent"
