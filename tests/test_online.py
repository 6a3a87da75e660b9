"""mode=online end to end (tiny budget), the KTO learner's refits, the model-backed serving policy
and its hot reload."""

import json
import pathlib
import shutil
import urllib.request

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from shapes import TINY_MODEL

from rlhb_jax import config as config_lib
from rlhb_jax.jobs import online, online_learners
from rlhb_jax.methods import sft as sft_lib
from rlhb_jax.model import build as build_lib
from rlhb_jax.run import Run
from rlhb_jax.serving import ServeConfig, make_server, open_store
from rlhb_jax.serving.policy import from_run, publish

ROOT = pathlib.Path(__file__).resolve().parents[1]


# configs/online.py at a tiny budget: the tiny model's shapes, 3 rounds of 12 queries, 1 step each.
TINY = {
  **TINY_MODEL,
  "model.vocab_size": 400,
  "sim.num_records": 300,
  "sim.drift_round": 1,
  "sft.steps": 3,
  "sft.batch_size": 8,
  "disc.warmup_steps": 2,
  "disc.batch_size": 8,
  "ppo.prompts_per_step": 8,
  "ppo.rollouts_per_prompt": 2,
  "sampling.max_new_tokens": 8,
  "eval.num_queries": 8,
  "eval.batch_size": 8,
  "log.progress": False,
  "log.tensorboard": False,
  "online.rounds": 3,
  "online.queries_per_round": 12,
  "online.steps_per_round": 1,
  "online.sft_steps": 1,
  "online.sft_rows": "all",
  "online.client_threads": 4,
  "serve.sqlite_synchronous": "NORMAL",
}


def tiny_online_config(**changes):
  cfg = config_lib.from_configdict(config_lib.load_configdict(ROOT / "configs/online.py"))
  return config_lib.replace(cfg, **(TINY | changes))


def read_rounds(workdir):
  return [
    [json.loads(x) for x in p.read_text().splitlines()]
    for p in sorted((workdir / "online").glob("round_*.jsonl"))
  ]


@pytest.mark.slow
def test_online_rounds_survive_a_crash_and_consume_every_event_once(tmp_path, monkeypatch):
  cfg = tiny_online_config()
  # Crash in round 1 after the trainer read the store (cursor advanced in memory) but before that
  # round's checkpoint: the restarted run must read those events again, and only once in total.
  real_save_round = online.Online.save_round

  def crash_in_round_1(self, r, records):
    if r == 1:
      raise KeyboardInterrupt("simulated kill")
    real_save_round(self, r, records)

  monkeypatch.setattr(online.Online, "save_round", crash_in_round_1)
  with pytest.raises(KeyboardInterrupt):
    online.run(cfg, tmp_path)
  assert [len(r) for r in read_rounds(tmp_path)] == [12]
  monkeypatch.setattr(online.Online, "save_round", real_save_round)

  summary = online.run(cfg, tmp_path)
  rounds = summary["rounds"]
  assert [e["round"] for e in rounds] == [0, 1, 2]
  assert summary["drift_round"] == 1
  for e in rounds:
    for key in ("like_rate_online", "like_rate_frozen", "like_rate_observed"):
      assert 0.0 <= e[key] <= 1.0
  # The frozen policy's answers never change; only the users do (drift at round 1).
  frozen = [e["like_rate_frozen"] for e in rounds]
  assert frozen[1] == frozen[2] and frozen[0] != frozen[1]
  assert rounds[0]["like_rate_online"] == rounds[0]["like_rate_frozen"]  # both are the start
  assert [e["model_step"] for e in rounds] == [0, 1, 2]

  # Round 1 re-read the 12 responses served before the crash, plus its own 12.
  per_round = read_rounds(tmp_path)
  assert [len(r) for r in per_round] == [12, 24, 12]
  assert [e["records"] for e in rounds] == [12, 24, 12]
  ids = [rec["id"] for r in per_round for rec in r]
  assert len(ids) == len(set(ids))
  with open_store("", tmp_path) as store:
    counts = store.counts()
    feed, _ = store.read_new()
  assert counts["responses"] == len(ids) == 48
  assert sum(rec["meta"]["events"] for r in per_round for rec in r) == counts["events"]
  # Each record's counts are the sums of its stored events.
  likes = {}
  for ev in feed.events:
    if ev.type == "likes":
      likes[ev.response_id] = likes.get(ev.response_id, 0) + ev.value
  for rec in (rec for r in per_round for rec in r):
    assert rec["behavior"]["likes"] == likes.get(rec["id"], 0)

  steps = [json.loads(x)["step"] for x in (tmp_path / "online.jsonl").read_text().splitlines()]
  assert steps == [1, 2, 3]
  assert (tmp_path / "plots" / "online_like_rate.png").exists()
  assert json.loads((tmp_path / "models" / "online_actor.json").read_text()) == {
    "step": 3,
    "round": 3,
  }

  # Roll the last round back: without its checkpoint the run resumes after round 1 and publishes
  # that round's model again (a serving replica on step 3 goes back to step 2), then runs round 2
  # again on its events (read again) and on new ones.
  replica = from_run(cfg, tmp_path)
  assert replica.model_step == 3
  shutil.rmtree(tmp_path / "checkpoints" / "online" / "3")
  honest, seen = online.simulate_clients, []

  def check_then_clients(url, sim, queries, r, *args):
    published = json.loads((tmp_path / "models" / "online_actor.json").read_text())
    seen.append((r, published, replica.maybe_reload(), replica.model_step))
    return honest(url, sim, queries, r, *args)

  monkeypatch.setattr(online, "simulate_clients", check_then_clients)
  rolled = online.run(cfg, tmp_path)["rounds"]
  assert seen == [(2, {"step": 2, "round": 2}, True, 2)]
  assert rolled[:2] == rounds[:2] and rolled[2]["model_step"] == 2
  assert rolled[2]["records"] == 24  # round 2's 12 responses read again, and 12 new ones
  steps = [json.loads(x)["step"] for x in (tmp_path / "online.jsonl").read_text().splitlines()]
  assert steps == [1, 2, 3]
  assert replica.maybe_reload() and replica.model_step == 3


@pytest.mark.slow
def test_online_with_lora_publishes_merged_weights_and_resumes(tmp_path):
  """LoRA on the generator and D: rounds train adapters only, deploy and publish the merged plain
  model, checkpoint without the base weights, and a longer run resumes after the last round."""
  lora = {"lora.rank": 2, "disc.lora.rank": 2, "online.rounds": 2}
  first = online.run(tiny_online_config(**lora), tmp_path)["rounds"]
  assert first[0]["like_rate_online"] == first[0]["like_rate_frozen"]  # B = 0: the SFT start
  run = Run(tiny_online_config(**lora), tmp_path).prepare()
  published = run.load_params("online_actor", run.base_actor())
  start = run.load_params("sft_actor", run.base_actor())
  assert not [k for k in published["layers"] if k.startswith("lora_")]
  pairs = zip(jax.tree.leaves(published), jax.tree.leaves(start), strict=True)
  assert max(float(np.abs(a - b).max()) for a, b in pairs) > 0  # the adapters moved it
  with ocp.StandardCheckpointer() as reader:
    saved = reader.metadata(tmp_path / "checkpoints" / "online" / "2" / "state").item_metadata
  assert saved["rlhb"]["frozen"] == {} and saved["sft"]["frozen"] == {}
  assert "lora_q_b" in saved["rlhb"]["actor"]["layers"]

  resumed = online.run(tiny_online_config(**(lora | {"online.rounds": 3})), tmp_path)["rounds"]
  assert resumed[:2] == first and [e["model_step"] for e in resumed] == [0, 1, 2]
  assert json.loads((tmp_path / "models" / "online_actor.json").read_text())["step"] == 3


def _max_diff(a, b) -> float:
  pairs = zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
  return max(float(np.abs(np.asarray(x) - np.asarray(y)).max()) for x, y in pairs)


@pytest.mark.slow
@pytest.mark.parametrize("rank", [0, 2])
def test_kto_continue_trains_the_deployed_model_further_against_sft(tmp_path, rank):
  """online.kto_refit=continue: round 1 starts from round 0's deployed weights, so at learning
  rate 0 it deploys them again (scratch gives the SFT generator back), and its reference is still
  the SFT generator (the implicit rewards of round 0's weights are not 0)."""
  cfg = tiny_online_config(
    **{
      "online.learner": "kto",
      "lora.rank": rank,
      "kto.steps": 2,
      "kto.batch_size": 8,
      "kto.optim.learning_rate": 1e-3,
      "kto.optim.warmup_steps": 1,
    }
  )
  run = Run(cfg, tmp_path).prepare()
  sft_lib.sft(run)
  sft = run.load_params("sft_actor", run.base_actor())
  rounds = [run.records[:150], run.records[150:]]
  out = {}
  for refit in ("scratch", "continue"):
    learner = online_learners.KTOLearner(
      Run(config_lib.replace(cfg, **{"online.kto_refit": refit}), tmp_path).prepare()
    )
    learner.train(0, rounds[:1], None)
    first = learner.generator()
    learner.cfg = config_lib.replace(learner.cfg, **{"kto.optim.learning_rate": 0.0})
    assert learner.train(1, rounds, None)["kto_steps"] == (4 if refit == "scratch" else 2)
    logged = [json.loads(x) for x in (tmp_path / "online_kto_001.jsonl").read_text().splitlines()]
    rewards = [abs(x[k]) for x in logged for k in ("desirable_reward", "undesirable_reward")]
    out[refit] = (first, learner.generator(), learner.step, max(rewards))
  (first, scratch, steps, scratch_reward), (first_c, cont, steps_c, cont_reward) = out.values()
  assert _max_diff(first, first_c) == 0  # round 0 trains from SFT either way
  assert _max_diff(first, sft) > 0
  # The implicit rewards: rounding of two differently batched forwards, or a trained policy's.
  assert _max_diff(scratch, sft) == 0 and scratch_reward < 1e-4
  assert _max_diff(cont, first) == 0 and cont_reward > 1e-2
  assert (steps, steps_c) == (2 + 4, 2 + 2)  # the model step counts every refit's steps


def _post(url, body):
  req = urllib.request.Request(
    url, json.dumps(body).encode(), {"Content-Type": "application/json"}, method="POST"
  )
  with urllib.request.urlopen(req, timeout=120) as resp:
    return json.loads(resp.read())


@pytest.mark.slow
def test_model_policy_serves_the_run_and_hot_reloads_published_weights(tmp_path):
  cfg = tiny_online_config(**{"sft.steps": 0, "disc.warmup_steps": 0})
  policy = from_run(cfg, tmp_path)
  assert policy.model_step == 0 and policy.context_fn is not None
  server = make_server(ServeConfig(port=0, sqlite_synchronous="NORMAL"), tmp_path, policy).start()
  try:
    out = _post(f"{server.url}/v1/generate", {"query": "What is the capital of France?"})
    assert isinstance(out["response"], str)
    with open_store("", tmp_path) as store:
      (row,) = store.read_new()[0].responses
    assert row.behavior == policy.default_behavior and row.model_step == 0
    assert not policy.maybe_reload()  # nothing published yet

    run = Run(cfg, tmp_path).prepare()
    model = run.base_actor()
    params = jax.tree.map(lambda x: np.asarray(x) + 0.01, build_lib.params_of(model))
    publish(run, params, step=7, round=1)
    assert policy.maybe_reload() and policy.model_step == 7
    served = build_lib.params_of(policy.model)
    for a, b in zip(jax.tree.leaves(served), jax.tree.leaves(params), strict=True):
      np.testing.assert_array_equal(np.asarray(a), b)
    assert not policy.maybe_reload()  # same step again: no reload
    _post(f"{server.url}/v1/generate", {"query": "What is 2 plus 2?", "behavior": "Users: x."})
    with open_store("", tmp_path) as store:
      rows = store.read_new()[0].responses
    assert rows[-1].model_step == 7 and rows[-1].behavior == "Users: x."
  finally:
    server.shutdown()
