"""End to end (issue #24): an attacker posting many likes on wrong answers, in an online round on
the tiny model, moves the round's behavior statistics and the trained generator only when the
defences are off.

Four runs of one round each share the offline stages (SFT, D warm-up) and the same honest users:
  honest:    serve.auth=keys, defences on, no attacker (the reference);
  defended:  serve.auth=keys, defences on, an attacker with one API key;
  open:      serve.auth=none, serve.ingest.cap and quarantine off, the same attacker;
  sybil:     serve.auth=keys_or_session, defences on (issue #39): the attacker mints page sessions
             until the address has its day's sessions, and each asks the attacked queries and
             posts one impression, like and click on each wrong answer.
The attacker asks the attacked queries itself (it can react only to answers it was shown), keeps
the answers the simulator judges wrong, and posts `VOTES` impressions, likes and clicks on each,
each with a fresh event id: what the issue's "one script posting 1,000 likes" does, at a size
that gives the answers the most preferred behavior text.

The tiny model's greedy answers are never correct after a few steps (accuracy 0.00 in all three
runs on 2026-12-04), and it already finds every liked wrong answer likelier than the right one
before the attack (choice accuracy 0.00 in all three runs), so accuracy can show no drop here; the
NLL of the liked wrong answers is what shows the poison reaching the weights (5.773 honest, 5.773
defended, 5.277 open on 2026-12-04, with grounded citations).

What is measured after the round: the round's like rate over the records the trainer learnt from,
and two things about the trained generator on the attacked queries: the simulator's accuracy of its
greedy answers, and its mean token NLL of the attacker's liked answers under the most preferred
behavior (the poison's target: a drop means the attack taught the model those answers).
"""

import dataclasses
import json
import shutil
import time
import urllib.error
import urllib.request

import numpy as np
import optax
import pytest
from flax import nnx
from test_online import tiny_online_config

from rlhb_jax.data.batches import Batcher, left_pad, right_pad
from rlhb_jax.data.behavior import least_preferred_text
from rlhb_jax.eval import evaluate
from rlhb_jax.jobs import online
from rlhb_jax.jobs.sim_users import request
from rlhb_jax.methods import disc as disc_lib
from rlhb_jax.methods import sft as sft_lib
from rlhb_jax.run import Run
from rlhb_jax.serving import add_key, open_store
from rlhb_jax.training import forward

ATTACKED_QUERIES = 4  # training queries the attacker asks, twice each
ASKS = 2
VOTES = 60  # impressions, likes and clicks it posts on each wrong answer (the median exposure)

DEFENDED = {
  "serve.auth": "keys",
  "serve.identity_rate": 50.0,  # the attacker is throttled, not stopped: what it gets in counts
  "serve.identity_burst": 100,
  "serve.ingest.min_volume": 30,  # a round of 12 answers: a few events per honest identity
}
OPEN = {"serve.auth": "none", "serve.ingest.cap": False, "serve.ingest.quarantine": False}


def config(**changes):
  return tiny_online_config(
    **{
      "online.rounds": 1,
      "online.queries_per_round": 12,
      "online.client_threads": 1,  # one batch per request: the honest answers are the same each run
      "online.sft_rows": "best",
      "online.sft_steps": 4,
      "online.sft_optim.learning_rate": 1e-3,
      "online.steps_per_round": 1,
    }
    | changes
  )


def ask(url, query, headers):
  """A generation, retried after Retry-After when the attacker's own flood drained its bucket."""
  while True:
    try:
      return request(f"{url}/v1/generate", {"query": query}, headers)
    except urllib.error.HTTPError as e:
      assert e.code == 429, e.read()
      time.sleep(float(e.headers["Retry-After"]))


def attack(url, sim, headers, liked, refused):
  """Asks, keeps the wrong answers, and floods each with votes (fresh event ids every time)."""
  for query in sim.queries("train")[:ATTACKED_QUERIES]:
    for _ in range(ASKS):
      answer = ask(url, query, headers)
      if sim.features(query, answer["response"]).answer == "correct":
        continue
      liked.append((query, answer["response"]))
      for kind in ("impressions", "likes", "clicks"):
        for i in range(VOTES):
          body = {"id": answer["id"], "event_id": f"{answer['id']}-{kind}-{i}", "type": kind}
          try:
            request(f"{url}/v1/feedback", body, headers)
          except urllib.error.HTTPError as e:
            assert e.code == 429, e.read()
            refused.append(e.headers["Retry-After"])


SYBIL = DEFENDED | {"serve.auth": "keys_or_session"}


def new_session(url):
  """A fresh page session's Cookie header, or None once the address had its day's sessions."""
  try:
    with urllib.request.urlopen(f"{url}/", timeout=60) as resp:
      return {"Cookie": resp.headers["Set-Cookie"].split(";")[0]}
  except urllib.error.HTTPError as e:
    assert e.code == 429, e.read()
    return None


def sybil_attack(url, sim, liked, minted):
  """Fresh identities instead of repeated votes: one vote of each kind per session and answer."""
  while (headers := new_session(url)) is not None:
    minted.append(headers)
    for query in sim.queries("train")[:ATTACKED_QUERIES]:
      answer = ask(url, query, headers)
      if sim.features(query, answer["response"]).answer == "correct":
        continue
      liked.append((query, answer["response"]))
      for kind in ("impressions", "likes", "clicks"):
        body = {"id": answer["id"], "event_id": f"{answer['id']}-{kind}", "type": kind}
        assert request(f"{url}/v1/feedback", body, headers) == {"duplicate": False}


def run_round(tmp_path, offline, name, changes, attacker: bool, monkeypatch):
  cfg = config(**changes)
  workdir = tmp_path / name
  shutil.copytree(offline, workdir)
  liked, refused = [], []
  headers = {}
  if attacker and cfg.serve.auth != "none":
    with open_store("", workdir) as store:
      headers = {"Authorization": f"Bearer {add_key(store, 'attacker')[1]}"}
  honest = online.simulate_clients

  def clients_then_attacker(url, sim, *args, **kwargs):
    totals = honest(url, sim, *args, **kwargs)
    if attacker and cfg.serve.auth == "keys_or_session":
      sybil_attack(url, sim, liked, refused)  # `refused`: the sessions minted
    elif attacker:
      attack(url, sim, headers, liked, refused)
    return totals

  monkeypatch.setattr(online, "simulate_clients", clients_then_attacker)
  summary = online.run(cfg, workdir)
  monkeypatch.setattr(online, "simulate_clients", honest)
  (entry,) = summary["rounds"]
  records = [
    json.loads(x) for x in (workdir / "online" / "round_000.jsonl").read_text().splitlines()
  ]
  return cfg, workdir, entry, records, liked, refused


def generator_on(cfg, workdir, examples):
  """The published generator on the attacked queries: the simulator's accuracy of its greedy
  answers; its mean token NLL of `examples` (the liked wrong answers, under the most preferred
  behavior text); and its choice accuracy: the share of those answers for which it finds the right
  answer to the same prompt (the search result's sentence) likelier per token than the wrong one."""
  run = Run(cfg, workdir).prepare()
  model = run.actor_model(prefer=("online_actor",))
  queries = sorted({e.query for e in examples})
  answers = evaluate.respond(run, model, queries)
  accuracy = evaluate.ground_truth(run, queries, answers)["accuracy"]
  batcher = Batcher(
    cfg, run.tokenizer, examples, run.best_behavior, least_preferred_text(cfg.behavior)
  )
  right = [dataclasses.replace(e, response=run.simulator.context(e.query)) for e in examples]
  graphdef, params = nnx.split(model)

  def nll(rows):
    enc = batcher.enc
    prompt = left_pad(
      [enc.prompt(e.query, e.behavior, e.context) for e in rows], batcher.P, batcher.pad
    )
    resp, resp_mask = right_pad([enc.response(e.response) for e in rows], batcher.Tn, batcher.pad)
    logits = forward.policy_logits(graphdef, params, *prompt, resp, resp_mask)
    ce = np.asarray(optax.softmax_cross_entropy_with_integer_labels(logits, resp))
    return (ce * resp_mask).sum(1) / resp_mask.sum(1)

  wrong_nll, right_nll = nll(examples), nll(right)
  return accuracy, float(wrong_nll.mean()), float((right_nll < wrong_nll).mean())


@pytest.mark.slow
def test_an_attacker_moves_the_round_only_without_the_defences(tmp_path, monkeypatch):
  offline = tmp_path / "offline"
  run = Run(config(), offline).prepare()
  sft_lib.sft(run)
  disc_lib.disc_warmup(run)

  cfg, honest_dir, honest, honest_records, _, _ = run_round(
    tmp_path, offline, "honest", DEFENDED, False, monkeypatch
  )
  _, defended_dir, defended, defended_records, liked, throttled = run_round(
    tmp_path, offline, "defended", DEFENDED, True, monkeypatch
  )
  _, open_dir, opened, open_records, liked_open, _ = run_round(
    tmp_path, offline, "open", OPEN, True, monkeypatch
  )
  _, sybil_dir, sybil, sybil_records, liked_sybil, minted = run_round(
    tmp_path, offline, "sybil", SYBIL, True, monkeypatch
  )
  assert liked and liked == liked_open  # the same wrong answers, liked the same way
  assert throttled  # the rate limit answered 429s to the defended attacker
  # 20 sessions (serve.sessions_per_address_per_day), each liking its own wrong answers (sampled:
  # not the other attackers' texts).
  assert len(minted) == 20 and len(liked_sybil) >= 20

  # The honest users are the same in every run: same records from them.
  def key(records):
    return sorted((r["query"], r["response"], json.dumps(r["behavior"])) for r in records)

  attacked = {r for _, r in liked}
  assert key(defended_records) == key(honest_records)
  assert key([r for r in open_records if r["response"] not in attacked]) == key(honest_records)

  # Defended: the attacker is flagged, all its events quarantined, the round unchanged.
  assert (defended["flagged_identities"], honest["flagged_identities"]) == (1, 0)
  assert defended["quarantined_events"] >= 30
  quarantine = (defended_dir / "online" / "quarantine_round_000.jsonl").read_text().splitlines()
  assert len(quarantine) == defended["quarantined_events"]
  assert defended["like_rate_records"] == honest["like_rate_records"]
  # Sybil: every session young (none of its votes counted) and part of a burst on the answers it
  # liked: all flagged and quarantined; the round is the honest one.
  assert key(sybil_records) == key(honest_records)
  assert sybil["flagged_identities"] == len(minted)
  assert sybil["quarantined_events"] == 3 * len(liked_sybil)
  assert sybil["like_rate_records"] == honest["like_rate_records"]
  # Open: the flood is in the records; "most users liked" the wrong answers.
  assert open_records and any(r["behavior"]["likes"] >= VOTES for r in open_records)
  assert opened["like_rate_records"] > honest["like_rate_records"] + 0.1

  # The liked answers as training examples (prompts as the trainer builds them from the open
  # run's records, search result included), under the most preferred behavior text.
  on = online.Online(cfg, open_dir)
  poisoned = [r for r in open_records if r["response"] in attacked]
  best = on.run.best_behavior
  examples = [dataclasses.replace(e, behavior=best) for e in on.examples(poisoned)]
  assert {(e.query, e.response) for e in examples} == set(liked)
  acc_honest, nll_honest, choice_honest = generator_on(cfg, honest_dir, examples)
  acc_defended, nll_defended, choice_defended = generator_on(cfg, defended_dir, examples)
  acc_open, nll_open, choice_open = generator_on(cfg, open_dir, examples)
  acc_sybil, nll_sybil, choice_sybil = generator_on(cfg, sybil_dir, examples)
  # And the answers the Sybils liked, under the model trained without them and with them.
  by_query = {e.query: e for e in examples}
  sybil_liked = [
    dataclasses.replace(by_query[q], response=r)
    for q, r in dict.fromkeys(liked_sybil)
    if q in by_query
  ]
  assert sybil_liked
  _, nll_sybil_honest, _ = generator_on(cfg, honest_dir, sybil_liked)
  _, nll_sybil_sybil, _ = generator_on(cfg, sybil_dir, sybil_liked)
  print(
    f"like rate of the records: honest {honest['like_rate_records']:.3f}, defended "
    f"{defended['like_rate_records']:.3f}, open {opened['like_rate_records']:.3f}, sybil "
    f"{sybil['like_rate_records']:.3f}; accuracy on the attacked queries: {acc_honest:.2f}, "
    f"{acc_defended:.2f}, {acc_open:.2f}, {acc_sybil:.2f}; NLL of the liked wrong answers: "
    f"{nll_honest:.3f}, {nll_defended:.3f}, {nll_open:.3f}, {nll_sybil:.3f}; choice accuracy, "
    f"right vs. liked wrong: {choice_honest:.2f}, {choice_defended:.2f}, {choice_open:.2f}, "
    f"{choice_sybil:.2f}; sybil: {len(minted)} sessions, {len(liked_sybil)} answers liked, "
    f"their NLL {nll_sybil_honest:.3f} honest, {nll_sybil_sybil:.3f} sybil"
  )
  assert abs(nll_defended - nll_honest) < 0.02 and acc_defended == acc_honest
  assert choice_defended == choice_honest
  assert abs(nll_sybil - nll_honest) < 0.02 and acc_sybil == acc_honest
  assert choice_sybil == choice_honest
  assert abs(nll_sybil_sybil - nll_sybil_honest) < 0.02
  assert nll_open < nll_honest - 0.1  # the open server taught the model the liked wrong answers
