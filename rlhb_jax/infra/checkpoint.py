"""Orbax checkpoints of a run: the whole train state plus the JSON needed to resume it exactly.

A checkpoint holds `state` (every role's trainable parameters and optimizer state, the step, the KL
coefficient and counters) and `meta` (config, data position, bin edges, tokenizer, extras). The RNG
is not stored: per-step keys are `fold_in(key(seed), step)`, and the step is in the state. Nor is a
state's `frozen` field, the base weights under LoRA: they never change, and a resumed run rebuilds
them from the stage's inputs (the target passed to `restore`), so a LoRA checkpoint holds adapters,
heads and optimizer state only.
"""

from __future__ import annotations

import pathlib
from typing import Any

import jax
import orbax.checkpoint as ocp

from rlhb_jax.infra.config import CheckpointConfig


class Checkpointer:
  """Keep-N, fixed-interval, optionally async checkpoints under `directory`."""

  def __init__(self, directory: pathlib.Path, cfg: CheckpointConfig):
    self.directory = pathlib.Path(directory).absolute()
    self.cfg = cfg
    self._closed = False
    options = ocp.CheckpointManagerOptions(
      max_to_keep=cfg.keep,
      save_interval_steps=max(1, cfg.every_steps),
      enable_async_checkpointing=cfg.async_save,
    )
    self.manager = ocp.CheckpointManager(
      self.directory, options=options, item_names=("state", "meta")
    )

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def should_save(self, step: int) -> bool:
    return self.manager.should_save(step)

  def save(self, step: int, state: Any, meta: dict, *, force: bool = False) -> bool:
    return self.manager.save(
      step,
      args=ocp.args.Composite(
        state=ocp.args.StandardSave(_without_frozen(state)), meta=ocp.args.JsonSave(meta)
      ),
      force=force,
    )

  def restore(self, target: Any, step: int | None = None) -> tuple[Any, dict]:
    """Restores into the structure, dtypes and shardings of `target` (arrays or
    ShapeDtypeStructs)."""
    step = self.latest_step() if step is None else step
    abstract = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
      _without_frozen(target),
    )
    out = self.manager.restore(
      step,
      args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()
      ),
    )
    return _with_frozen(out["state"], target), out["meta"]

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    if self._closed:
      return
    self._closed = True
    self.manager.wait_until_finished()
    self.manager.close()


def _has_frozen(state: Any) -> bool:
  return hasattr(state, "frozen") and hasattr(state, "replace")


def _without_frozen(tree: Any) -> Any:
  """`tree` (a state, or states in a dict) with every state's frozen base weights left out."""
  return jax.tree.map(
    lambda x: x.replace(frozen={}) if _has_frozen(x) else x, tree, is_leaf=_has_frozen
  )


def _with_frozen(restored: Any, target: Any) -> Any:
  """`restored` with the frozen base weights of the matching states of `target` put back."""
  return jax.tree.map(
    lambda r, t: r.replace(frozen=t.frozen) if _has_frozen(t) else r,
    restored,
    target,
    is_leaf=_has_frozen,
  )
