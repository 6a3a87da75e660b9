"""Figures and tables from the metric streams that `infra/metrics.py` writes.

* `plot_series` and `plot_training` draw PNG figures (matplotlib, imported on first use).
* `format_table` and `format_markdown_table` print summaries (e.g. method x like/dislike rate).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from rlhb_jax.infra.metrics import read_jsonl


def _moving_average(y: np.ndarray, window: int) -> np.ndarray:
  """Trailing mean over the last `window` points (fewer at the start); same length as `y`."""
  c = np.cumsum(np.insert(y, 0, 0.0))
  hi = np.arange(1, len(y) + 1)
  lo = np.maximum(hi - window, 0)
  return (c[hi] - c[lo]) / (hi - lo)


def plot_series(
  path: Path,
  series: Mapping[str, tuple[Sequence[float], Sequence[float]]],
  title: str,
  xlabel: str,
  ylabel: str,
  hline: float | None = None,
  smooth: int = 0,
  vline: tuple[float, str] | None = None,
) -> Path:
  """Draws named (x, y) line series into one PNG figure.

  Non-finite and None points are dropped. With `smooth > 1` each raw series is drawn faintly and
  a trailing moving average over `smooth` points is overlaid in the same colour.

  Args:
    path: output PNG file; parent directories are created.
    series: label -> (xs, ys).
    title, xlabel, ylabel: figure text.
    hline: draw a dashed horizontal reference line at this y (e.g. 0.5 for discriminator scores).
    smooth: moving-average window in points; 0 or 1 disables smoothing.
    vline: (x, label): a dotted vertical marker, e.g. the round the users drifted.

  Returns:
    `path`.
  """
  # Figure without pyplot renders with Agg, needs no global backend switch and is thread safe.
  from matplotlib.figure import Figure

  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fig = Figure(figsize=(7, 4), dpi=100)
  ax = fig.add_subplot()
  for i, (label, (xs, ys)) in enumerate(series.items()):
    x = np.asarray(xs, dtype=np.float64)
    y = np.asarray([np.nan if v is None else v for v in ys], dtype=np.float64)
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    color = f"C{i}"
    if smooth > 1 and len(y) > smooth:
      ax.plot(x, y, color=color, alpha=0.3, linewidth=1)
      ax.plot(x, _moving_average(y, smooth), color=color, linewidth=1.8, label=label)
    else:
      ax.plot(x, y, color=color, linewidth=1.5, marker="o" if len(y) <= 20 else None, label=label)
  if hline is not None:
    ax.axhline(hline, color="gray", linestyle="--", linewidth=1)
  if vline is not None:
    ax.axvline(vline[0], color="gray", linestyle=":", linewidth=1.2, label=vline[1])
  ax.set_title(title)
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  ax.grid(True, alpha=0.3)
  if series or vline is not None:
    ax.legend(loc="best")
  fig.tight_layout()
  fig.savefig(path, format="png")
  return path


def _column(rows: Iterable[Mapping[str, Any]], name: str) -> tuple[list, list]:
  """(steps, values) of the rows that logged `name` (nulls kept as NaN gaps, then dropped)."""
  xs, ys = [], []
  for r in rows:
    if name in r and "step" in r:
      xs.append(r["step"])
      ys.append(r[name])
  return xs, ys


# file name -> (title, y label, metric names, dashed reference line)
_TRAINING_PLOTS = {
  "disc_loss.png": ("Discriminator loss", "loss", ("disc_loss",), None),
  "disc_scores.png": ("Discriminator scores", "D(x)", ("d_real", "d_fake", "d_swap"), 0.5),
  "return.png": ("Return and reward", "value", ("return_mean", "reward_mean"), None),
  "kl.png": ("KL to reference", "value", ("kl", "kl_coef"), None),
}


def plot_training(
  workdir: Path, stream: str = "metrics", out_dir: Path | None = None
) -> list[Path]:
  """Plots the standard training curves from `workdir/{stream}.jsonl`.

  Writes into `out_dir` (default `workdir/plots`): disc_loss.png, disc_scores.png (d_real, d_fake,
  d_swap, dashed line at 0.5), return.png (return_mean, reward_mean), kl.png (kl, kl_coef), and
  eval_like_rate.png from `workdir/eval.jsonl` rows {"step", "like_rate"} if that file exists. A
  figure whose metrics were never logged is skipped; the others get a moving-average overlay.

  Returns:
    The written PNG paths.
  """
  workdir = Path(workdir)
  out_dir = workdir / "plots" if out_dir is None else Path(out_dir)
  metrics_path = workdir / f"{stream}.jsonl"
  rows = read_jsonl(metrics_path) if metrics_path.exists() else []
  written = []
  for filename, (title, ylabel, names, hline) in _TRAINING_PLOTS.items():
    series = {n: _column(rows, n) for n in names}
    series = {n: s for n, s in series.items() if any(v is not None for v in s[1])}
    if not series:
      continue
    n = max(len(s[0]) for s in series.values())
    smooth = min(25, max(1, n // 20))
    written.append(plot_series(out_dir / filename, series, title, "step", ylabel, hline, smooth))
  eval_path = workdir / "eval.jsonl"
  if eval_path.exists():
    xs, ys = _column(read_jsonl(eval_path), "like_rate")
    if any(v is not None for v in ys):
      path = out_dir / "eval_like_rate.png"
      written.append(plot_series(path, {"like_rate": (xs, ys)}, "Eval like rate", "step", "rate"))
  return written


def _cell(v: Any) -> str:
  if v is None:
    return "-"
  if isinstance(v, float | np.floating):
    return f"{v:.3f}"
  return str(v)


def _is_number(v: Any) -> bool:
  return isinstance(v, int | float | np.integer | np.floating) and not isinstance(v, bool)


def _numeric_columns(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> list[bool]:
  """A column is numeric (right-aligned) if it has a value and every present value is a number."""
  out = []
  for c in columns:
    vals = [r[c] for r in rows if r.get(c) is not None]
    out.append(bool(vals) and all(_is_number(v) for v in vals))
  return out


def format_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
  """A plain-text table: header, dashes, one line per row; floats with 3 decimals.

  Numeric columns are right-aligned, the others left-aligned; missing values print as "-".
  Columns are separated by two spaces and lines carry no trailing spaces.
  """
  cells = [[_cell(r.get(c)) for c in columns] for r in rows]
  widths = [max([len(c)] + [len(line[i]) for line in cells]) for i, c in enumerate(columns)]
  numeric = _numeric_columns(rows, columns)

  def line(parts: Sequence[str]) -> str:
    padded = (
      p.rjust(w) if num else p.ljust(w) for p, w, num in zip(parts, widths, numeric, strict=True)
    )
    return "  ".join(padded).rstrip()

  out = [line(columns), "  ".join("-" * w for w in widths)]
  out += [line(c) for c in cells]
  return "\n".join(out)


def format_markdown_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
  """A GitHub-flavoured Markdown table; numeric columns right-aligned, floats with 3 decimals."""
  esc = lambda s: s.replace("|", "\\|")
  numeric = _numeric_columns(rows, columns)
  out = [
    "| " + " | ".join(esc(c) for c in columns) + " |",
    "| " + " | ".join("---:" if num else "---" for num in numeric) + " |",
  ]
  out += ["| " + " | ".join(esc(_cell(r.get(c))) for c in columns) + " |" for r in rows]
  return "\n".join(out)
