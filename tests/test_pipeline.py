"""End to end through the CLI: a smoke run of the pipeline, kill-and-resume, SmolLM2 RLHB."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = [
  "--config.model.embed_dim=32",
  "--config.model.num_layers=1",
  "--config.model.num_heads=2",
  "--config.model.num_kv_heads=1",
  "--config.model.head_dim=16",
  "--config.model.mlp_dim=64",
  "--config.model.vocab_size=400",
  "--config.disc.init_from_generator=True",
  "--config.sim.num_records=300",
  "--config.sft.steps=4",
  "--config.sft.batch_size=8",
  "--config.disc.warmup_steps=2",
  "--config.disc.batch_size=8",
  "--config.ppo.prompts_per_step=4",
  "--config.ppo.rollouts_per_prompt=2",
  "--config.sampling.max_new_tokens=8",
  "--config.eval.num_queries=8",
  "--config.eval.batch_size=8",
  "--config.log.progress=False",
]


def cli(workdir, *args, mode="pipeline") -> list[str]:
  return [
    sys.executable,
    "-m",
    "rlhb_jax.main",
    "--config",
    str(ROOT / "configs/tiny.py"),
    "--workdir",
    str(workdir),
    f"--config.mode={mode}",
    *TINY,
    *args,
  ]


def env() -> dict:
  return {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1"}


def why(stderr: str, limit: int = 4000) -> str:
  """A failed run's error: its first traceback onwards, not only the noise printed at exit."""
  start = stderr.find("Traceback (most recent call last)")
  return stderr[start : start + limit] if start >= 0 else stderr[-limit:]


@pytest.mark.slow
def test_default_pipeline_smoke(tmp_path):
  out = subprocess.run(
    cli(tmp_path, "--config.rlhb.steps=2"), capture_output=True, text=True, env=env(), timeout=600
  )
  assert out.returncode == 0, why(out.stderr)
  summary = json.loads((tmp_path / "summary.json").read_text())
  assert 0.0 < summary["disc"]["fake_mean"] < 1.0
  # The showcase (eval/showcase.py): the ceiling, the changed answers, the knob, the report.
  samples = json.loads((tmp_path / "eval_samples.json").read_text())
  differ = [s for s in samples if " ".join(s["sft"].split()) != " ".join(s["rlhb"].split())]
  assert summary["changed"]["changed"] == len(differ)
  assert summary["changed"]["total"] == len(samples) == summary["ceiling"]["num_queries"]
  sft_like = float(np.mean([s["like"]["sft"] for s in samples]))
  assert summary["methods"]["sft"]["like_rate"] == pytest.approx(sft_like)
  top = summary["ceiling"]["like_rate"]
  rl_like = summary["methods"]["rlhb"]["like_rate"]
  assert summary["ceiling"]["gap_closed"]["rlhb"] == pytest.approx(
    (rl_like - sft_like) / (top - sft_like)
  )
  assert list(summary["knob"]) == ["most preferred", "least preferred", "mixed"]
  assert len({v["behavior"] for v in summary["knob"].values()}) == 3
  report = (tmp_path / "report.html").read_text()
  assert report.count("data:image/png;base64,") >= 3 and "behavior knob" in report
  assert out.stdout.rstrip().endswith(f"report: {tmp_path / 'report.html'}")
  rows = [json.loads(line) for line in (tmp_path / "rlhb.jsonl").read_text().splitlines()]
  assert [r["step"] for r in rows] == [1, 2]
  assert (tmp_path / "plots" / "disc_scores.png").exists()
  assert "like_rate" in out.stdout
  assert _moved(tmp_path, "sft_actor", "rlhb_actor") > 0  # the two RLHB steps changed the weights


def _moved(workdir: pathlib.Path, before: str, after: str) -> float:
  """The largest absolute change of any weight between two saved models of a run."""
  a, b = _params(workdir / "models" / before), _params(workdir / "models" / after)
  leaves = zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
  return max(float(np.abs(np.asarray(x) - np.asarray(y)).max()) for x, y in leaves)


def _params(path: pathlib.Path):
  with ocp.StandardCheckpointer() as ckptr:
    return ckptr.restore(path)


def _metrics(path: pathlib.Path) -> list[dict]:
  drop = {"time", "step_time", "tokens_per_s"}
  rows = [json.loads(line) for line in path.read_text().splitlines()]
  return [{k: v for k, v in r.items() if k not in drop} for r in rows]


@pytest.mark.slow
def test_kill_and_resume_is_bit_identical(tmp_path):
  args = ["--config.rlhb.steps=8", "--config.checkpoint.every_steps=2"]
  full, killed = tmp_path / "full", tmp_path / "killed"
  done = subprocess.run(cli(full, *args, mode="rlhb"), capture_output=True, text=True, env=env())
  assert done.returncode == 0, why(done.stderr)

  proc = subprocess.Popen(
    cli(killed, *args, mode="rlhb"), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env()
  )
  ckpt_dir = killed / "checkpoints" / "rlhb"
  deadline = time.time() + 600
  while time.time() < deadline and proc.poll() is None:
    # A finished Orbax step directory has no ".orbax-checkpoint-tmp" suffix.
    steps = [p for p in ckpt_dir.glob("*") if p.name.isdigit()] if ckpt_dir.exists() else []
    if any(int(p.name) >= 2 for p in steps):
      break
    time.sleep(0.2)
  assert proc.poll() is None, "the run ended before it could be killed"
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert not (killed / "models" / "rlhb_actor").exists()

  resumed = subprocess.run(
    cli(killed, *args, mode="rlhb"), capture_output=True, text=True, env=env()
  )
  assert resumed.returncode == 0, why(resumed.stderr)
  a, b = _params(full / "models" / "rlhb_actor"), _params(killed / "models" / "rlhb_actor")
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(x, y)
  assert _metrics(full / "rlhb.jsonl") == _metrics(killed / "rlhb.jsonl")
  assert [r["step"] for r in _metrics(killed / "rlhb.jsonl")] == list(range(1, 9))


@pytest.mark.slow
def test_smollm2_sim_pipeline_end_to_end(tmp_path):
  """The real-model pipeline (SmolLM2 in every role, LoRA, group advantages) through the CLI:
  simulate -> SFT -> D warm-up -> RLHB -> eval, and the summary of the default demo's schema."""
  cmd = [
    sys.executable,
    "-m",
    "rlhb_jax.main",
    "--config",
    str(ROOT / "configs/smollm2_sim.py"),
    "--workdir",
    str(tmp_path),
    "--config.sft.steps=2",
    "--config.disc.warmup_steps=2",
    "--config.rlhb.steps=2",
    "--config.eval.num_queries=8",
    "--config.sim.num_records=300",
    "--config.ppo.prompts_per_step=2",
    "--config.log.progress=False",
  ]
  out = subprocess.run(cmd, capture_output=True, text=True, env=env(), timeout=1500)
  assert out.returncode == 0, why(out.stderr)
  summary = json.loads((tmp_path / "summary.json").read_text())
  assert set(summary) == {
    "methods", "ceiling", "changed", "knob", "knob_seconds", "disc", "wall_seconds"
  }  # fmt: skip
  assert set(summary["methods"]["rlhb"]) >= {"like_rate", "accuracy", "win", "tie", "loss"}
  rows = [json.loads(line) for line in (tmp_path / "rlhb.jsonl").read_text().splitlines()]
  assert [r["step"] for r in rows] == [1, 2]
  for r in rows:  # no critic: no value loss; the reward is D's probability
    assert r["nonfinite"] == 0 and "value_loss" not in r and 0.0 < r["reward_mean"] < 1.0
  # Every stage saved a plain model (adapters merged), of the checkpoint's shape.
  sft, rl = _params(tmp_path / "models" / "sft_actor"), _params(tmp_path / "models" / "rlhb_actor")
  assert not [k for k in rl["layers"] if k.startswith("lora_")]
  assert rl["layers"]["wq"].shape == (30, 576, 9, 64)
  pairs = zip(jax.tree.leaves(sft), jax.tree.leaves(rl), strict=True)
  moved = max(float(np.abs(a - b).max()) for a, b in pairs)
  assert moved > 0  # RLHB changed the generator (through its merged adapters)


def test_eval_without_an_sft_generator_says_so(tmp_path):
  """mode=eval on a run with no models/sft_actor stops and names it (the base weights would
  otherwise be scored as SFT)."""
  out = subprocess.run(cli(tmp_path, mode="eval"), capture_output=True, text=True, env=env())
  assert out.returncode == 2, why(out.stderr)
  assert f"eval error: {tmp_path / 'models' / 'sft_actor'} is missing" in out.stderr
  assert not (tmp_path / "eval.json").exists()


@pytest.mark.slow
def test_dpo_and_kto_modes_then_eval(tmp_path):
  """mode=dpo and mode=kto on the embedded default write their generators and data reports;
  mode=eval then scores them beside SFT and RLHB."""
  small = ["--config.dpo.steps=3", "--config.kto.steps=3", "--config.sim.num_records=600"]
  runs = (  # RLHB first: its SFT stage writes sft_actor, where DPO and KTO start
    ("rlhb", "--config.rlhb.steps=2"),
    ("dpo",),
    ("dpo", "--config.dpo.pairs=annotators"),
    ("kto",),
    ("eval",),
  )
  for mode, *extra in runs:
    out = subprocess.run(
      cli(tmp_path, *small, *extra, mode=mode),
      capture_output=True,
      text=True,
      env=env(),
      timeout=600,
    )
    assert out.returncode == 0, why(out.stderr)
  dpo = json.loads((tmp_path / "models" / "dpo.json").read_text())
  kto = json.loads((tmp_path / "models" / "kto.json").read_text())
  assert dpo["pairs"] > 0 and dpo["pairs"] <= dpo["candidate_pairs"]
  assert 0.0 <= dpo["heldout_accuracy"] <= 1.0
  assert kto["desirable"] > 0 and kto["undesirable"] > 0
  assert kto["heldout_answers"] > 0 and 0.0 <= kto["heldout_auc"] <= 1.0
  for name in ("dpo_actor", "dpo_annotators_actor", "kto_actor"):
    assert _moved(tmp_path, "sft_actor", name) > 0, name  # three steps moved it off SFT
  assert (
    kto["desirable"] + kto["undesirable"] + kto["neither"] + kto["below_min_impressions"]
    == kto["records"]
  )
  assert [json.loads(x)["step"] for x in (tmp_path / "dpo.jsonl").read_text().splitlines()] == [
    1,
    2,
    3,
  ]
  results = json.loads((tmp_path / "eval.json").read_text())
  assert set(results) == {"sft", "rlhb", "dpo", "dpo_annotators", "kto"}
  assert (tmp_path / "models" / "dpo_annotators.json").exists()
  for name in ("dpo", "dpo_annotators", "kto"):
    assert results[name]["win"] + results[name]["tie"] + results[name]["loss"] == pytest.approx(1)
