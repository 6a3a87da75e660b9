"""Tests for rlhb_jax.infra.metrics and report: JSONL logs, resume truncation, plots, tables."""

from __future__ import annotations

import io
import json
import math
import struct

import numpy as np
import pytest

from rlhb_jax.infra import metrics, report
from rlhb_jax.infra.metrics import MetricsWriter, Progress, read_jsonl
from rlhb_jax.infra.report import format_markdown_table, format_table, plot_training


def test_jsonl_round_trip_nan_is_null(tmp_path):
  with MetricsWriter(tmp_path, tensorboard=False) as w:
    w.write(0, {"loss": np.float32(1.5), "acc": np.array(0.25), "n": 3})
    w.write(1, {"loss": float("nan"), "acc": np.array([0.5]), "kl": -np.inf})
  text = (tmp_path / "metrics.jsonl").read_text()
  assert "NaN" not in text and "Infinity" not in text
  rows = read_jsonl(tmp_path / "metrics.jsonl")
  assert [r["step"] for r in rows] == [0, 1]
  assert rows[0]["loss"] == 1.5 and rows[0]["acc"] == 0.25 and rows[0]["n"] == 3.0
  assert rows[1]["loss"] is None and rows[1]["kl"] is None and rows[1]["acc"] == 0.5
  assert all(isinstance(r["time"], float) and r["time"] > 1e9 for r in rows)
  # Reopening appends rather than overwriting.
  with MetricsWriter(tmp_path, tensorboard=False) as w:
    w.write(2, {"loss": 0.5})
  assert [r["step"] for r in read_jsonl(tmp_path / "metrics.jsonl")] == [0, 1, 2]


def test_write_rejects_non_scalar_and_reserved_names(tmp_path):
  with MetricsWriter(tmp_path, tensorboard=False, stream="sft") as w:
    with pytest.raises(ValueError, match="scalar"):
      w.write(0, {"loss": np.zeros(3)})
    with pytest.raises(ValueError, match="reserved"):
      w.write(0, {"step": 1.0})
  assert (tmp_path / "sft.jsonl").read_text() == ""
  with pytest.raises(ValueError, match="closed"):
    w.write(1, {"loss": 1.0})


def test_truncate_from_removes_later_steps(tmp_path):
  with MetricsWriter(tmp_path, tensorboard=False) as w:
    for step in range(6):
      w.write(step, {"loss": float(step)})
  # Simulate a crash mid-line: the torn fragment must not corrupt what comes next.
  with open(tmp_path / "metrics.jsonl", "a") as f:
    f.write('{"step": 6, "lo')
  with MetricsWriter(tmp_path, tensorboard=False) as w:
    assert w.truncate_from(4) == 3  # steps 4, 5 and the torn line
    w.write(4, {"loss": 40.0})
    w.write(5, {"loss": 50.0})
  rows = read_jsonl(tmp_path / "metrics.jsonl")
  assert [(r["step"], r["loss"]) for r in rows] == [
    (0, 0.0),
    (1, 1.0),
    (2, 2.0),
    (3, 3.0),
    (4, 40.0),
    (5, 50.0),
  ]
  assert not (tmp_path / "metrics.jsonl.tmp").exists()


def test_torn_line_without_truncate_is_skipped(tmp_path):
  (tmp_path / "metrics.jsonl").write_text('{"step": 0, "x": 1.0}\n{"step": 1, "x"')
  with MetricsWriter(tmp_path, tensorboard=False) as w:
    w.write(1, {"x": 2.0})
  rows = read_jsonl(tmp_path / "metrics.jsonl")
  assert [(r["step"], r["x"]) for r in rows] == [(0, 1.0), (1, 2.0)]


def test_tensorboard_events_written(tmp_path):
  pytest.importorskip("tensorboardX")
  with MetricsWriter(tmp_path, stream="disc_warmup") as w:
    w.write(0, {"disc_loss": 0.7, "bad": float("nan")})
    w.flush()
  events = list((tmp_path / "tb" / "disc_warmup").glob("events.out.tfevents.*"))
  assert len(events) == 1
  scalars = _read_scalars(events[0])
  # The finite value is there at its step; the NaN is not written at all.
  assert scalars == {("disc_loss", 0): pytest.approx(0.7)}


def _read_scalars(path) -> dict[tuple[str, int], float]:
  """The scalar summaries of a TensorBoard event file: records of (u64 length, u32 crc, Event, u32
  crc), read with tensorboardX's own Event proto."""
  from tensorboardX.proto import event_pb2

  data, out, at = path.read_bytes(), {}, 0
  while at < len(data):
    (n,) = struct.unpack("<Q", data[at : at + 8])
    event = event_pb2.Event.FromString(data[at + 12 : at + 12 + n])
    at += 12 + n + 4
    for value in event.summary.value:
      out[(value.tag, event.step)] = value.simple_value
  return out


def test_tensorboard_missing_warns_once(tmp_path, monkeypatch, caplog):
  import builtins

  real_import = builtins.__import__

  def fake_import(name, *args, **kwargs):
    if name == "tensorboardX":
      raise ImportError(name)
    return real_import(name, *args, **kwargs)

  monkeypatch.setattr(builtins, "__import__", fake_import)
  monkeypatch.setattr(metrics, "_tb_warned", False)
  for stream in ("a", "b"):
    with MetricsWriter(tmp_path, stream=stream) as w:
      w.write(0, {"x": 1.0})
      w.write(1, {"x": 2.0})
  assert sum("tensorboardX" in r.message for r in caplog.records) == 1
  assert len(read_jsonl(tmp_path / "b.jsonl")) == 2
  assert not (tmp_path / "tb").exists()


def _synthetic_run(workdir, n=60, with_eval=True):
  with MetricsWriter(workdir, tensorboard=False) as w:
    for step in range(n):
      w.write(
        step,
        {
          "disc_loss": 0.69 - 0.002 * step,
          "d_real": 0.5 + 0.003 * step,
          "d_fake": 0.5 - 0.003 * step,
          "return_mean": math.sin(step / 5),
          "reward_mean": float("nan") if step == 3 else 0.1 * step,
        },
      )
  if with_eval:
    with open(workdir / "eval.jsonl", "w") as f:
      for step in (0, 20, 40):
        f.write(json.dumps({"step": step, "like_rate": 0.3 + step / 100}) + "\n")


def test_plot_training_writes_expected_pngs(tmp_path):
  _synthetic_run(tmp_path)
  paths = plot_training(tmp_path)
  names = sorted(p.name for p in paths)
  # kl.png is skipped: neither kl nor kl_coef was logged.
  assert names == ["disc_loss.png", "disc_scores.png", "eval_like_rate.png", "return.png"]
  for p in paths:
    assert p.parent == tmp_path / "plots"
    assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert sorted(q.name for q in (tmp_path / "plots").iterdir()) == names


def test_plot_training_skips_missing_eval_and_respects_out_dir(tmp_path):
  _synthetic_run(tmp_path, n=5, with_eval=False)
  paths = plot_training(tmp_path, out_dir=tmp_path / "figs")
  assert sorted(p.name for p in paths) == ["disc_loss.png", "disc_scores.png", "return.png"]
  assert all(p.exists() and p.parent == tmp_path / "figs" for p in paths)
  assert plot_training(tmp_path, stream="nothing_here") == []


def test_moving_average():
  y = np.array([1.0, 2.0, 3.0, 4.0, 5.0])
  np.testing.assert_allclose(report._moving_average(y, 2), [1.0, 1.5, 2.5, 3.5, 4.5])
  np.testing.assert_allclose(report._moving_average(y, 10), [1.0, 1.5, 2.0, 2.5, 3.0])


def test_progress_postfix_and_disabled():
  buf = io.StringIO()
  with Progress(10, initial=2, file=buf, keys=("reward", "tok/s")) as p:
    p.update(5, {"reward": np.float32(0.123456), "tok/s": 12345.6, "hidden": 1.0})
    assert p._bar.n == 5
    assert p._bar.postfix == "reward=0.123, tok/s=12346"
  assert "hidden" not in buf.getvalue()
  off = Progress(10, enabled=False)
  off.update(3, {"reward": 1.0})
  off.close()


ROWS = [
  {"method": "rlhb", "like": 0.51234, "n": 10},
  {"method": "sft-baseline", "like": None, "n": 3},
]


def test_format_table_exact():
  expected = (
    "method         like   n\n"
    "------------  -----  --\n"
    "rlhb          0.512  10\n"
    "sft-baseline      -   3"
  )
  assert format_table(ROWS, ["method", "like", "n"]) == expected


def test_format_markdown_table_exact():
  expected = (
    "| method | like | n |\n| --- | ---: | ---: |\n| rlhb | 0.512 | 10 |\n| sft-baseline | - | 3 |"
  )
  assert format_markdown_table(ROWS, ["method", "like", "n"]) == expected
