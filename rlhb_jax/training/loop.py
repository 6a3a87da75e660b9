"""The host loop shared by every training stage: resume, step, log, checkpoint, stop on faults."""

from __future__ import annotations

import logging
import pathlib
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from rlhb_jax.config import Config
from rlhb_jax.infra import sharding
from rlhb_jax.infra.checkpoint import Checkpointer
from rlhb_jax.infra.metrics import MetricsWriter, Progress

log = logging.getLogger(__name__)

Monitor = Callable[[int, dict[str, float]], None]


class NonFiniteError(RuntimeError):
  pass


class _NoWriter:
  """The metrics writer of every process but the first: the run's files have one author."""

  def truncate_from(self, step: int) -> int:
    return 0

  def write(self, step: int, values: dict) -> None:
    pass

  def close(self) -> None:
    pass


def train_loop(
  *,
  name: str,
  workdir: pathlib.Path,
  cfg: Config,
  step_fn: Callable,
  state: Any,
  lead: tuple[int, Callable] | None = None,
  batch_fn: Callable[[int], dict],
  num_steps: int,
  rng: jax.Array,
  meta: dict,
  monitor: Monitor | None = None,
  rows_per_step: int = 0,
  show: tuple[str, ...] = ("loss",),
  hook: Callable[[int, Any], dict[str, float]] | None = None,
  hook_every: int = 0,
  batch_shardings: dict | None = None,
) -> Any:
  """Runs `state, metrics = step_fn(state, batch_fn(s), rng)` for s in [resumed step, num_steps).

  Metrics of step s are converted to floats (a host sync) only after step s+1 was dispatched, so
  logging never stalls the device. A checkpoint is written every `checkpoint.every_steps` and at the
  end; a run found in `workdir/checkpoints/<name>` resumes from its latest step. With `hook`, every
  `hook_every` steps after the lead `hook(step, state)` returns extra metrics (e.g. an evaluation)
  logged at that step. With `batch_shardings` each host batch becomes global arrays, every process
  placing only its own devices' rows (`sharding.global_batch`); every process checkpoints, the
  first alone writes metrics and shows progress. With `lead=(k, lead_fn)` steps s < k run
  `lead_fn` (same signature) instead of `step_fn`: the discriminator's D-only lead of a PPO stage.
  """
  lead_until, lead_fn = lead if lead is not None else (0, None)
  ckpt = Checkpointer(workdir / "checkpoints" / name, cfg.checkpoint)
  if ckpt.latest_step() is not None:
    state, _ = ckpt.restore(state)
    log.info("%s: resumed from step %d", name, int(state.step))
  start = int(state.step)
  primary = sharding.is_primary()
  if primary:
    writer = MetricsWriter(workdir, tensorboard=cfg.log.tensorboard, stream=name)
  else:
    writer = _NoWriter()
  writer.truncate_from(start + 1)  # rows up to the checkpointed step stay
  progress = Progress(
    total=num_steps, initial=start, desc=name, enabled=cfg.log.progress and primary
  )
  pending: tuple[int, dict] | None = None
  last_time = time.perf_counter()

  def flush(pending):
    nonlocal last_time
    s, metrics = pending
    values = {k: float(np.asarray(v)) for k, v in metrics.items()}
    now = time.perf_counter()
    values["step_time"] = now - last_time
    last_time = now
    if rows_per_step and "response_length" in values:
      values["tokens_per_s"] = rows_per_step * values["response_length"] / values["step_time"]
    writer.write(s + 1, values)
    progress.update(s + 1, {k: values[k] for k in show if k in values})
    if monitor is not None:
      try:
        monitor(s + 1, values)
      except NonFiniteError:
        ckpt.wait()
        if ckpt.latest_step() != int(state.step):
          ckpt.save(int(state.step), state, meta, force=True)
        ckpt.close()
        writer.close()
        raise

  try:
    for s in range(start, num_steps):
      batch = batch_fn(s)
      if batch_shardings is not None:
        batch = sharding.global_batch(batch, batch_shardings)
      state, metrics = (lead_fn if s < lead_until else step_fn)(state, batch, rng)
      if pending is not None:
        flush(pending)
      pending = (s, metrics)
      # The hook counts the steps after the lead: an evaluation every `hook_every` actor updates.
      after_lead = s + 1 - lead_until
      if hook is not None and hook_every > 0 and after_lead > 0 and after_lead % hook_every == 0:
        flush(pending)
        pending = None
        writer.write(s + 1, hook(s + 1, state))
        last_time = time.perf_counter()  # the evaluation is not the next step's time
      if ckpt.should_save(s + 1):
        # Log this step before checkpointing it, so a resumed run's metrics have no gap.
        if pending is not None:
          flush(pending)
          pending = None
        ckpt.save(s + 1, state, meta)
    if pending is not None:
      flush(pending)
    ckpt.wait()
    if ckpt.latest_step() != num_steps:
      ckpt.save(num_steps, state, meta, force=True)
  finally:  # an error lets pending async saves finish first (no half-written step at exit)
    progress.close()
    writer.close()
    ckpt.close()
  return state


def rlhb_monitor(cfg: Config) -> Monitor:
  """Stops after K non-finite updates in a row; raises the collapse alarm on a pinned D(fake)."""
  run = {"collapsed": 0}

  def check(step: int, m: dict[str, float]) -> None:
    if m.get("nonfinite_run", 0) >= cfg.rlhb.max_nonfinite_in_row:
      raise NonFiniteError(
        f"step {step}: {int(m['nonfinite_run'])} non-finite updates in a row "
        f"(config.rlhb.max_nonfinite_in_row={cfg.rlhb.max_nonfinite_in_row}); checkpoint saved"
      )
    d_fake = m.get("d_fake_rollout", 0.5)
    pinned = d_fake > cfg.rlhb.collapse_high or d_fake < cfg.rlhb.collapse_low
    run["collapsed"] = run["collapsed"] + 1 if pinned else 0
    if run["collapsed"] == cfg.rlhb.collapse_patience:
      log.warning(
        "COLLAPSE ALARM at step %d: mean D(fake) = %.3f stayed outside [%.2f, %.2f] for %d steps",
        step,
        d_fake,
        cfg.rlhb.collapse_low,
        cfg.rlhb.collapse_high,
        cfg.rlhb.collapse_patience,
      )

  return check
