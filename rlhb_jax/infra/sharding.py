"""Device mesh and the logical-axis rules that place every parameter on it.

Every parameter carries logical axis names (`batch, length, embed, heads, kv_heads, head_dim, mlp,
vocab, layers, out`). One rules table (config.mesh.rules) maps them to the mesh axes
`('data', 'fsdp', 'tensor')`; FSDP vs. tensor parallelism is a change of that table, not of code.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from rlhb_jax.infra.config import MeshConfig

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")


def make_mesh(cfg: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """Mesh of shape cfg.shape over ('data', 'fsdp', 'tensor'); one -1 takes the remaining devices."""
  devices = list(devices if devices is not None else jax.devices())
  shape = list(cfg.shape)
  if len(shape) != 3:
    raise ValueError(f"config.mesh.shape={cfg.shape}: expected 3 sizes (data, fsdp, tensor)")
  if shape.count(-1) > 1:
    raise ValueError(f"config.mesh.shape={cfg.shape}: at most one -1")
  known = math.prod(s for s in shape if s != -1)
  if -1 in shape:
    shape[shape.index(-1)] = len(devices) // known
  if math.prod(shape) != len(devices):
    raise ValueError(
      f"config.mesh.shape={cfg.shape} needs {math.prod(shape)} devices, have {len(devices)}"
    )
  return jax.make_mesh(tuple(shape), MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


def logical_to_spec(
  axes: Sequence[str | None], rules: Sequence[tuple[str, Any]], shape=None, mesh: Mesh | None = None
) -> PartitionSpec:
  """PartitionSpec for logical axes. A dimension not divisible by its mesh axes stays replicated.

  Raises:
    ValueError: an unknown logical axis, or two logical axes of one array on the same mesh axis.
  """
  table = dict(rules)
  used: dict[str, str] = {}
  spec = []
  for i, name in enumerate(axes):
    if name is None:
      spec.append(None)
      continue
    if name not in table:
      raise ValueError(f"logical axis {name!r} has no rule in config.mesh.rules")
    target = table[name]
    mesh_axes = () if target is None else (target,) if isinstance(target, str) else tuple(target)
    for m in mesh_axes:
      if m in used:
        raise ValueError(f"logical axes {used[m]!r} and {name!r} both map to mesh axis {m!r}")
      used[m] = name
    if mesh is not None and shape is not None and mesh_axes:
      size = math.prod(mesh.shape[m] for m in mesh_axes)
      if shape[i] % size:
        logging.debug("axis %s (%d) not divisible by %d: replicated", name, shape[i], size)
        mesh_axes = ()
    spec.append(None if not mesh_axes else mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes)
  return PartitionSpec(*spec)


def logical_axes(module: nnx.Module) -> dict:
  """Pure dict (same tree as the params) of each parameter's logical axis names."""
  state = nnx.state(module, nnx.Param)
  axes = jax.tree.map(
    lambda v: v.get_metadata().get("logical_axes"),
    state,
    is_leaf=lambda x: isinstance(x, nnx.Variable),
  )
  return nnx.to_pure_dict(axes)


def param_shardings(params: Any, axes: Any, mesh: Mesh, rules) -> Any:
  """NamedShardings for a param tree, given a matching tree of logical axis tuples."""
  return jax.tree.map(
    lambda p, a: NamedSharding(mesh, logical_to_spec(a, rules, np.shape(p), mesh)),
    params,
    axes,
    is_leaf=lambda x: isinstance(x, tuple),
  )


def batch_sharding(mesh: Mesh, ndim: int, rows: int | None = None) -> NamedSharding:
  """Leading (batch) dimension over ('data', 'fsdp'), the rest replicated; replicated whole when
  `rows` is not a multiple of the batch axes' size."""
  if rows is not None and rows % math.prod(mesh.shape[a] for a in BATCH_AXES):
    return replicated(mesh)
  return NamedSharding(mesh, PartitionSpec(BATCH_AXES, *([None] * (ndim - 1))))


def constrain_batch(x: jax.Array) -> jax.Array:
  """`x` (inside jit) with its leading axis over the set mesh's batch axes, when there is a mesh
  and the rows divide: the model's residual stream stays split by rows. Without it XLA may keep
  FSDP's weights split on `embed` and replicate the activations instead: compiled for a v5e-8,
  Llama-3-8B's prefill of 128 rows then needed 19 GB of temporaries a chip (docs/TPU.md)."""
  mesh = jax.sharding.get_abstract_mesh()
  axes = tuple(a for a in BATCH_AXES if a in mesh.axis_names)
  size = math.prod(mesh.shape[a] for a in axes)
  if size == 1 or x.shape[0] % size:
    return x
  return jax.lax.with_sharding_constraint(x, PartitionSpec(axes))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


# -- several processes (multi-host) -------------------------------------------------------------


def is_primary() -> bool:
  """Whether this process writes the run's files (metrics, plots, summaries, exports)."""
  return jax.process_index() == 0


def barrier(name: str) -> None:
  """Waits until every process reaches `name` (nothing to wait for in a single process)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices(name)


def global_batch(batch: dict[str, np.ndarray], shardings: dict[str, NamedSharding]) -> dict:
  """Global arrays from a host batch that every process computes alike (batches are a pure
  function of the step): each process places only the rows of its own devices."""
  return {
    k: jax.make_array_from_callback(v.shape, shardings[k], lambda idx, v=v: v[idx])
    for k, v in batch.items()
  }


def place(tree: Any, shardings: Any) -> Any:
  """`tree` (host or single-device arrays, alike on every process) put on the mesh."""
  if jax.process_count() == 1:
    return jax.device_put(tree, shardings)

  def put(x, s):  # process-local arrays cannot go straight to a global sharding: via the host
    if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      data = jax.device_put(np.asarray(jax.random.key_data(x)), s)
      return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
    return jax.device_put(np.asarray(x), s)

  return jax.tree.map(put, tree, shardings)


def to_host(tree: Any) -> Any:
  """NumPy copies of a tree of (possibly sharded, multi-process) arrays, on every process."""
  if jax.process_count() == 1:
    return jax.device_get(tree)
  from jax.experimental import multihost_utils

  def get(x):
    if not isinstance(x, jax.Array) or x.is_fully_addressable:
      return np.asarray(jax.device_get(x))
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))

  return jax.tree.map(get, tree)
