"""Tests for rlhb_jax.training.loop.rlhb_monitor: the non-finite stop and the collapse alarm."""

from __future__ import annotations

import logging

import pytest

from rlhb_jax.config import Config, replace
from rlhb_jax.training.loop import NonFiniteError, rlhb_monitor

CFG = replace(
  Config(),
  **{
    "rlhb.max_nonfinite_in_row": 3,
    "rlhb.collapse_high": 0.9,
    "rlhb.collapse_low": 0.1,
    "rlhb.collapse_patience": 4,
  },
)


def test_stops_at_k_nonfinite_updates_in_a_row_and_not_before():
  check = rlhb_monitor(CFG)
  check(1, {"nonfinite_run": 1.0, "d_fake_rollout": 0.5})
  check(2, {"nonfinite_run": 2.0, "d_fake_rollout": 0.5})
  with pytest.raises(NonFiniteError, match=r"step 3: 3 non-finite updates in a row"):
    check(3, {"nonfinite_run": 3.0, "d_fake_rollout": 0.5})


def _alarms(caplog) -> list[str]:
  return [r.getMessage() for r in caplog.records if "COLLAPSE ALARM" in r.getMessage()]


@pytest.mark.parametrize("pinned", [0.95, 0.02], ids=["high", "low"])
def test_collapse_alarm_once_after_patience_pinned_steps(caplog, pinned):
  check = rlhb_monitor(CFG)
  with caplog.at_level(logging.WARNING, logger="rlhb_jax.training.loop"):
    for step in range(1, 4):
      check(step, {"d_fake_rollout": pinned})
    assert _alarms(caplog) == []  # three pinned steps: under the patience of four
    check(4, {"d_fake_rollout": pinned})
    assert len(_alarms(caplog)) == 1 and "at step 4" in _alarms(caplog)[0]
    for step in range(5, 9):  # still pinned: the alarm is not repeated every step
      check(step, {"d_fake_rollout": pinned})
    assert len(_alarms(caplog)) == 1


def test_a_step_inside_the_band_resets_the_collapse_count(caplog):
  check = rlhb_monitor(CFG)
  with caplog.at_level(logging.WARNING, logger="rlhb_jax.training.loop"):
    for step, d_fake in enumerate([0.95, 0.95, 0.95, 0.5, 0.95, 0.95, 0.95], start=1):
      check(step, {"d_fake_rollout": d_fake})
    assert _alarms(caplog) == []
    check(8, {"d_fake_rollout": 0.95})
    assert ["at step 8" in m for m in _alarms(caplog)] == [True]
