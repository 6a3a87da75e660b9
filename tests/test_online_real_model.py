"""experiments/online_real_model.py on the tiny model at tiny budgets: every arm runs on the same
start and the same users, the JSON has the promised shape, and a rerun skips finished rounds."""

import collections
import importlib.util
import json
import pathlib
import shutil

import numpy as np
import pytest
from test_online import TINY

from rlhb_jax.jobs import online

ROOT = pathlib.Path(__file__).resolve().parents[1]
ARMS = ["rlhb", "kto", "oracle"]


def _script():
  spec = importlib.util.spec_from_file_location(
    "online_real_model", ROOT / "experiments" / "online_real_model.py"
  )
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _logged(workdir, arm, r):
  """(query, impressions) of each answer the arm served in round r."""
  path = workdir / "seed_0" / arm / "online" / f"round_{r:03d}.jsonl"
  rows = [json.loads(x) for x in path.read_text().splitlines()]
  return collections.Counter((x["query"], x["behavior"]["impressions"]) for x in rows)


@pytest.mark.slow
def test_online_real_model_runs_every_arm_on_the_same_users_and_resumes(tmp_path, monkeypatch):
  script = _script()
  tiny = {k: v for k, v in TINY.items() if k not in ("online.rounds", "sim.drift_round")}
  # The untrained tiny model's answers are all undesirable: KTO trains on them unbalanced.
  tiny |= {"kto.balance": False, "kto.batch_size": 8}
  tiny["online.steps_per_round"] = 2  # two RLHB steps a round: the curves' round means average
  argv = [
    "--seeds=0",
    "--config=configs/online.py",
    "--rounds=2",
    "--drift-round=1",
    f"--runs={tmp_path / 'runs'}",
    f"--saved={tmp_path / 'saved'}",
    f"--out={tmp_path / 'out.json'}",
    f"--plot={tmp_path / 'plot.png'}",
    "--",
    *(f"--config.{k}={v}" for k, v in tiny.items()),
  ]
  out = script.main(argv)
  assert json.loads((tmp_path / "out.json").read_text()) == out
  assert out["seeds"] == [0] and out["drift_round"] == 1 and out["arms"] == ["frozen", *ARMS]
  assert "--rounds=2" in out["command"] and "--config.kto.balance=False" in out["command"]
  assert "--kto-refit=continue" in out["command"] and out["kto_refit"] == "continue"
  # KTO's share of a round: (1 SFT step x 8 rows + 2 RLHB steps x 8 prompts x 2 rollouts) / 8.
  assert out["kto_steps_per_round"] == 5
  rounds = out["runs"]["0"]["rounds"]
  assert [r["round"] for r in rounds] == [0, 1]
  for r in rounds:
    for key, _ in script.SCORES:
      assert set(r[key]) == {"frozen", *ARMS}
    for key in script.SERVED:
      assert set(r[key]) == set(ARMS)
  # Round 0 serves the SFT generator in every arm; then each arm deploys what it trained.
  for key, _ in script.SCORES:
    assert set(rounds[0][key].values()) == {rounds[0][key]["frozen"]}
  assert rounds[1]["model_step"] == {"rlhb": 2, "kto": 5, "oracle": 2}
  # The RLHB arm's D and reward per training step (two a round here), and their round means.
  steps = out["runs"]["0"]["steps"]["rlhb"]
  assert [s["round"] for s in steps] == [0, 0, 1, 1]
  for i, r in enumerate(rounds):
    for key in ("d_real", "d_fake", "reward_mean"):
      mine = [s[key] for s in steps[2 * i : 2 * i + 2]]
      assert r["train"]["rlhb"][key] == pytest.approx(np.mean(mine))
      assert all(0.0 <= v <= 1.0 for v in mine)
  oracle = rounds[0]["train"]["oracle"]  # PPO on the simulator: a reward, no D
  assert "d_real" not in oracle and "reward_mean" in oracle
  assert out["runs"]["0"]["targets"] == script.targets(rounds, 1)
  assert out["runs"]["0"]["targets"]["above_frozen_from_round"] == 2
  assert out["runs"]["0"]["targets"]["rlhb_above_frozen"] is None  # 2 rounds: none to judge
  assert set(out["runs"]["0"]["targets"]["post_drift_mean"]) == {"frozen", *ARMS}
  assert (tmp_path / "plot.png").exists() and (tmp_path / "plot_curves.png").exists()
  # The same users: every arm scores the same frozen policy, and serves the same queries, each
  # shown to as many users, in every round (the frozen like rate moves with the drift).
  summaries = {
    arm: json.loads((tmp_path / "runs" / "seed_0" / arm / "online_summary.json").read_text())
    for arm in ARMS
  }
  frozen = [[e["like_rate_frozen"] for e in s["rounds"]] for s in summaries.values()]
  assert frozen[0] == frozen[1] == frozen[2] == [r["like_rate"]["frozen"] for r in rounds]
  assert frozen[0][0] != frozen[0][1]
  for r in (0, 1):
    assert _logged(tmp_path / "runs", "rlhb", r) == _logged(tmp_path / "runs", "kto", r)
    assert _logged(tmp_path / "runs", "rlhb", r) == _logged(tmp_path / "runs", "oracle", r)

  # Rerun: finished arms are read back, not run; an arm whose summary misses its last round
  # resumes from its checkpoint after round 1 and runs no round again (the same wall times).
  kto = tmp_path / "runs" / "seed_0" / "kto" / "online_summary.json"
  cut = json.loads(kto.read_text())
  kto.write_text(json.dumps(cut | {"rounds": cut["rounds"][:1]}))
  saved = tmp_path / "saved" / "seed_0"
  assert sorted(p.name for p in saved.iterdir()) == [
    "kto.json",
    "offline.json",
    "oracle.json",
    "rlhb.json",
  ]
  (saved / "kto.json").unlink()
  calls = []
  run = online.run

  def counted(cfg, workdir, *args, **kwargs):
    calls.append(pathlib.Path(workdir).name)
    return run(cfg, workdir, *args, **kwargs)

  monkeypatch.setattr(online, "run", counted)
  again = _script().main(argv)
  assert calls == ["kto"]
  assert again["runs"] == out["runs"]

  # Another session: the run directories are gone; the saved arms gather alone, nothing trains.
  shutil.rmtree(tmp_path / "runs")
  calls.clear()
  assert (
    _script().main([*argv[: -1 - len(tiny)], "--report", *argv[-1 - len(tiny) :]])["runs"]
    == out["runs"]
  )
  assert calls == []


def test_targets_checks_rlhb_against_frozen_and_kto_after_the_drift():
  script = _script()
  like = [  # (frozen, rlhb, kto) per round; the drift at round 2
    (0.5, 0.5, 0.5),
    (0.5, 0.4, 0.6),  # before the drift: not checked
    (0.3, 0.2, 0.4),  # the drift round itself: in the mean, not in the per-round check
    (0.3, 0.5, 0.3),
    (0.3, 0.4, 0.3),
  ]
  rounds = [{"like_rate": {"frozen": f, "rlhb": r, "kto": k}} for f, r, k in like]
  out = script.targets(rounds, drift=2)
  assert out["above_frozen_from_round"] == 3 and out["rlhb_above_frozen"] is True
  assert out["post_drift_mean"]["rlhb"] == pytest.approx((0.2 + 0.5 + 0.4) / 3)
  assert out["post_drift_mean"]["kto"] == pytest.approx(1.0 / 3)
  assert out["rlhb_mean_at_least_kto"] is True
  rounds[4]["like_rate"]["rlhb"] = 0.3  # equal to frozen is not above it
  rounds[3]["like_rate"]["kto"] = 0.6
  out = script.targets(rounds, drift=2)
  assert out["rlhb_above_frozen"] is False and out["rlhb_mean_at_least_kto"] is False
  # Nothing to judge: no drift, or the rounds gathered end before the second post-drift round.
  none = script.targets(rounds, drift=-1)
  assert none["rlhb_above_frozen"] is None and none["post_drift_mean"] == {}
  assert "rlhb_mean_at_least_kto" not in none
  assert script.targets(rounds[:3], drift=2)["rlhb_above_frozen"] is None
