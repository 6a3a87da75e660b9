"""Observability for the training loops (RL, SFT, discriminator warm-up).

* `MetricsWriter` appends one JSON object per step to `workdir/{stream}.jsonl` and mirrors the
  finite scalars into TensorBoard event files under `workdir/tb/{stream}`.
* `Progress` is a tqdm bar with an ETA and a compact postfix of a few chosen metrics.
* `read_jsonl` reads a stream back; `infra/report.py` turns streams into figures and tables.

Nothing here touches JAX: values are converted with `np.asarray`, which blocks on a device array.
So a loop should write the PREVIOUS step's metrics after dispatching the current step. Only one
process (e.g. `jax.process_index() == 0`) should own a writer for a given workdir.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

_RESERVED = ("step", "time")
_tb_warned = False  # warn once per process, not once per writer, when tensorboardX is missing


def _to_float(name: str, value: Any) -> float:
  """Converts a scalar (Python, NumPy or device array) to float; blocks on device arrays."""
  a = np.asarray(value)
  if a.size != 1:
    raise ValueError(f"metric {name!r} must be a scalar, got shape {a.shape}")
  return float(a.reshape(()))


class MetricsWriter(contextlib.AbstractContextManager):
  """Appends per-step scalar metrics to `{stream}.jsonl` and (optionally) TensorBoard.

  Each JSONL line is `{"step": int, "time": unix seconds, <name>: float | null, ...}`; non-finite
  values become `null` (JSON has no NaN) and are left out of TensorBoard. The file is line
  buffered, so a crash loses at most the line being written. A resumed run appends to the same
  file; call `truncate_from(resume_step)` first so steps after the checkpoint are not duplicated.

  Usage:
    with MetricsWriter(workdir) as w:
      w.truncate_from(start_step)
      for step in ...:
        w.write(step, prev_metrics)
  """

  def __init__(self, workdir: Path, *, tensorboard: bool = True, stream: str = "metrics"):
    self.workdir = Path(workdir)
    self.stream = stream
    self.path = self.workdir / f"{stream}.jsonl"
    self.tb_dir = self.workdir / "tb" / stream
    self._tensorboard = tensorboard
    self._tb: Any = None  # tensorboardX.SummaryWriter, created on first use
    self._purge_step: int | None = None
    self.workdir.mkdir(parents=True, exist_ok=True)
    self._file = self._open()

  def _open(self):
    """Opens the JSONL file for appending, first ending a torn last line left by a crash."""
    needs_newline = False
    if self.path.exists() and self.path.stat().st_size > 0:
      with open(self.path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        needs_newline = f.read(1) != b"\n"
    f = open(self.path, "a", encoding="utf-8", buffering=1)  # noqa: SIM115 (owned by self)
    if needs_newline:
      f.write("\n")  # the torn fragment stays one bad line that read_jsonl skips
    return f

  def _tb_writer(self) -> Any:
    """The TensorBoard writer, imported and created lazily; None if disabled or unavailable."""
    global _tb_warned
    if not self._tensorboard:
      return None
    if self._tb is None:
      try:
        from tensorboardX import SummaryWriter
      except ImportError:
        if not _tb_warned:
          logger.warning("tensorboardX is not installed; metrics go to JSONL only")
          _tb_warned = True
        self._tensorboard = False
        return None
      # purge_step makes TensorBoard drop events at steps >= it from an earlier, longer run.
      self._tb = SummaryWriter(str(self.tb_dir), purge_step=self._purge_step, flush_secs=30)
    return self._tb

  def truncate_from(self, step: int) -> int:
    """Drops every logged row with `row["step"] >= step` (and unparseable lines).

    The file is rewritten to a temporary file and atomically renamed over the original, so a crash
    midway leaves either the old or the new file. TensorBoard events cannot be edited in place;
    instead the next event file starts with a purge marker at `step`.

    Returns:
      The number of lines removed.
    """
    self._file.close()
    removed = 0
    if self.path.exists():
      kept = []
      with open(self.path, encoding="utf-8") as f:
        for line in f:
          if not line.strip():
            continue
          try:
            keep = int(json.loads(line)["step"]) < step
          except (ValueError, KeyError, TypeError):
            keep = False
          if keep:
            kept.append(line if line.endswith("\n") else line + "\n")
          else:
            removed += 1
      tmp = self.path.with_name(self.path.name + ".tmp")
      with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(kept)
        f.flush()
        os.fsync(f.fileno())
      os.replace(tmp, self.path)
    self._file = self._open()
    if self._tensorboard:
      if self._tb is not None:
        self._tb.close()
        self._tb = None
      self._purge_step = int(step)
    return removed

  def write(self, step: int, metrics: Mapping[str, Any]) -> None:
    """Logs scalar `metrics` at `step`; each value goes through `float(np.asarray(v))`."""
    if self._file.closed:
      raise ValueError(f"write() on a closed MetricsWriter ({self.path})")
    now = time.time()
    values = {}
    for name, v in metrics.items():
      if name in _RESERVED:
        raise ValueError(f"metric name {name!r} is reserved")
      values[name] = _to_float(name, v)
    row = {"step": int(step), "time": now}
    row |= {k: (v if math.isfinite(v) else None) for k, v in values.items()}
    self._file.write(json.dumps(row, allow_nan=False) + "\n")
    tb = self._tb_writer()
    if tb is not None:
      for name, v in values.items():
        if math.isfinite(v):
          tb.add_scalar(name, v, int(step), walltime=now)

  def flush(self) -> None:
    """Pushes buffered data to disk (the JSONL file is line buffered already)."""
    if not self._file.closed:
      self._file.flush()
    if self._tb is not None:
      self._tb.flush()

  def close(self) -> None:
    """Closes the JSONL file and the TensorBoard writer; calling it twice is harmless."""
    if not self._file.closed:
      self._file.close()
    if self._tb is not None:
      self._tb.close()
      self._tb = None

  def __exit__(self, *exc) -> None:
    self.close()


def _compact(v: float) -> str:
  """Short number for a progress-bar postfix: 3 significant digits, no exponent below 1e6."""
  if not math.isfinite(v):
    return str(v)
  if abs(v) >= 1000:
    return f"{v:.0f}" if abs(v) < 1e6 else f"{v:.2e}"
  return f"{v:.3g}"


class Progress(contextlib.AbstractContextManager):
  """A tqdm progress bar over `total` steps, with an ETA and a few metrics in the postfix.

  `update(step, postfix)` takes the absolute step, so a resumed run (`initial=start_step`) and
  skipped steps both show correctly. On a non-TTY (log files, job schedulers) the bar redraws at
  most every 2 s so logs stay readable. `enabled=False` (e.g. on non-zero processes) makes every
  method a no-op.

  Args:
    total: last step (exclusive) of the run.
    initial: first step, for resumed runs (the ETA counts only steps run in this process).
    enabled: draw the bar at all.
    desc: label in front of the bar.
    keys: metric names shown in the postfix, in this order; None shows every postfix entry.
    file: stream to draw on (default sys.stderr).
  """

  def __init__(
    self,
    total: int,
    *,
    initial: int = 0,
    enabled: bool = True,
    desc: str | None = None,
    keys: Sequence[str] | None = None,
    file: Any = None,
  ):
    self.keys = tuple(keys) if keys is not None else None
    self._bar = None
    if not enabled:
      return
    from tqdm import tqdm

    file = sys.stderr if file is None else file
    tty = hasattr(file, "isatty") and file.isatty()
    self._bar = tqdm(
      total=total,
      initial=initial,
      desc=desc,
      file=file,
      unit="step",
      dynamic_ncols=tty,
      mininterval=0.1 if tty else 2.0,
      smoothing=0.1,
    )

  def update(self, step: int, postfix: Mapping[str, Any] | None = None) -> None:
    """Moves the bar to `step` and shows `postfix` (only `keys`, if given) compactly."""
    if self._bar is None:
      return
    if postfix:
      names = self.keys if self.keys is not None else tuple(postfix)
      shown = {k: _compact(_to_float(k, postfix[k])) for k in names if k in postfix}
      self._bar.set_postfix(shown, refresh=False)
    self._bar.update(step - self._bar.n)

  def write(self, message: str) -> None:
    """Prints a line without breaking the bar."""
    if self._bar is None:
      print(message)
    else:
      self._bar.write(message)

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()
      self._bar = None

  __exit__ = MetricsWriter.__exit__


def read_jsonl(path: Path) -> list[dict]:
  """Reads one JSON object per line; blank lines and unparseable (torn) lines are skipped."""
  rows, bad = [], 0
  with open(path, encoding="utf-8") as f:
    for line in f:
      if not line.strip():
        continue
      try:
        rows.append(json.loads(line))
      except json.JSONDecodeError:
        bad += 1
  if bad:
    logger.warning("skipped %d unparseable line(s) in %s", bad, path)
  return rows
