"""mode=online: deploy -> collect -> train, round after round, while the users drift.

Before the first round the run's offline stages give the starting policy (SFT and the warmed-up
discriminator on the logs in the run). Then each round r:

  1. deploy: the current generator answers over HTTP (the real server of `rlhb_jax.serving`, in
     this process, storing every response in the feedback store, `DIR/feedback.db` by default);
  2. collect: `online.source="sim"`: the simulator's users, with round r's segment mix, ask
     `queries_per_round` training queries through `POST /v1/generate` and report what they did
     (impressions, clicks, likes, dislikes, requeries) through `POST /v1/feedback` (with
     `serve.auth` other than none, each user with its own API key and one vote: `sim_users.py`);
     `"live"`: wait until real clients produced `min_records` new records;
  3. aggregate: the trainer reads the store after its cursor (each event exactly once), sets
     aside the events of anomalous identities (`serving.ingest`, `serve.ingest`; written to
     `online/quarantine_round_RRR.jsonl` and counted), sums each response's votes into a log
     record and verbalizes it with the run's bin edges;
  4. train (`online.learner`, `jobs/online_learners.py`): "rlhb", `sft_steps` SFT steps on the
     fresh records, then `steps_per_round` RLHB steps whose data pool is the records of the last
     `window_rounds` rounds: the discriminator learns from the fresh real triplets, the generator
     is rewarded for what it says the most preferred behavior looks like now; or "kto", KTO
     refit from the SFT generator on every round's records so far;
  5. checkpoint the learner's state with the store cursor and the round history (keyed by the
     number of rounds done), and publish the weights (`models/online_actor`, which a separate
     `mode=serve` process hot-reloads).

Under LoRA (`config.lora.rank`, `config.disc.lora.rank`) the rounds train adapters only, PPO and
the per-round SFT steps alike, and what is deployed and published is the plain generator with its
adapters merged.

With a simulator, each round also scores the deployed policy and a frozen copy of the starting
policy on held-out queries (greedy, most preferred behavior) under that round's users (like,
dislike, requery and click rates, accuracy, grounded and fabricated citations: `*_online`,
`*_frozen`). After every round it rewrites `DIR/online_summary.json` (with each round's
`wall_seconds`) and `DIR/plots/online_like_rate.png`. A killed run resumes from the last
finished round: records read after that round's checkpoint are read again, and nothing that was
trained on is read twice. The same resume rolls rounds back (docs/ONLINE.md): with the checkpoints
after round k removed, the run resumes after round k, publishes that round's generator again (so
`mode=serve` replicas swap it in) and reads the later events again.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import logging
import pathlib
import time
import urllib.request

import numpy as np
from flax import nnx

from rlhb_jax import config as config_lib
from rlhb_jax.config import Config
from rlhb_jax.data.batches import Example
from rlhb_jax.eval import evaluate
from rlhb_jax.infra.checkpoint import Checkpointer
from rlhb_jax.infra.metrics import MetricsWriter, Progress
from rlhb_jax.infra.report import format_table, plot_series
from rlhb_jax.jobs import sim_users
from rlhb_jax.jobs.online_learners import make_learner, round_examples
from rlhb_jax.methods import disc as disc_lib
from rlhb_jax.methods import sft as sft_lib
from rlhb_jax.run import Run
from rlhb_jax.serving import aggregate_records, ingest, make_server, open_store, start_cursor
from rlhb_jax.serving.policy import ModelPolicy, publish, published, search_result_fn

log = logging.getLogger(__name__)


def _post(url: str, body: dict, timeout: float = 120.0) -> dict:
  req = urllib.request.Request(
    url, json.dumps(body).encode(), {"Content-Type": "application/json"}, method="POST"
  )
  with urllib.request.urlopen(req, timeout=timeout) as resp:
    return json.loads(resp.read())


def simulate_clients(
  url: str, sim, queries: list[str], round: int, seed: int, threads: int, users=None, pool=0
):
  """The simulator's users at `round`: ask every query, then send back what they did.

  Returns the behavior counts summed over the round (what the platform observed). With `users`
  (`sim_users.SimUsers`), each simulated user is its own identity among `pool` users.
  """
  if users is not None:
    return sim_users.simulate(url, sim, queries, round, seed, threads, users, pool)
  with concurrent.futures.ThreadPoolExecutor(threads) as pool:
    answers = list(pool.map(lambda q: _post(f"{url}/v1/generate", {"query": q}), queries))
  events, totals = [], {}
  for i, (q, a) in enumerate(zip(queries, answers, strict=True)):
    rng = np.random.default_rng([seed, round, i, 11])
    counts = sim.sample_behavior(q, a["response"], sim.sample_impressions(rng), rng, round)
    for kind, value in counts.items():
      totals[kind] = totals.get(kind, 0) + value
      if value:
        events.append(
          {"id": a["id"], "event_id": f"{a['id']}-{kind}", "type": kind, "value": value}
        )
  with concurrent.futures.ThreadPoolExecutor(threads) as pool:
    list(pool.map(lambda e: _post(f"{url}/v1/feedback", e), events))
  return totals


def behavior_totals(records: list[dict]) -> dict[str, float]:
  """Each behavior type summed over `records`."""
  totals = {}
  for rec in records:
    for k, v in rec["behavior"].items():
      totals[k] = totals.get(k, 0) + v
  return totals


class Online:
  """The state of an online run between rounds (see the module docstring)."""

  def __init__(self, cfg: Config, workdir: pathlib.Path):
    self.cfg = cfg
    self.run = Run(cfg, workdir).prepare()
    self.dir = self.run.workdir / "online"
    self.dir.mkdir(parents=True, exist_ok=True)
    self.sim = None if cfg.data.path and cfg.online.source == "live" else self.run.simulator

  def search_result_fn(self):
    """query -> the search result its answer is shown with, or None when the logs carry none."""
    return search_result_fn(self.sim) if (self.sim is not None and self.run.uses_context) else None

  def examples(self, records: list[dict]) -> list[Example]:
    return round_examples(self.run, records)

  def round_path(self, r: int) -> pathlib.Path:
    return self.dir / f"round_{r:03d}.jsonl"

  def save_round(self, r: int, records: list[dict]) -> None:
    tmp = self.round_path(r).with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(x) + "\n" for x in records))
    tmp.replace(self.round_path(r))

  def load_round(self, r: int) -> list[dict]:
    path = self.round_path(r)
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []

  def collect(self, store, cursor: dict, server, r: int, users=None, clients=None):
    """New records for round r: (records, cursor after them, observed behavior totals, what the
    screening of identities found). `clients(url, r)` acts first when given (see `run`)."""
    cfg, serve = self.cfg.online, self.cfg.serve
    observed = {}
    if clients is not None:
      observed = clients(server.url, r) or {}
    elif cfg.source == "sim":
      queries = self.sim.queries("train")
      rng = np.random.default_rng([self.cfg.seed, r, 5])
      picked = [queries[i] for i in rng.choice(len(queries), cfg.queries_per_round)]
      observed = simulate_clients(
        server.url, self.sim, picked, r, self.cfg.seed, cfg.client_threads, users, cfg.sim_users
      )
    events, records = [], []
    while True:
      feed, cursor = store.read_new(cursor)
      events += feed.events
      screened = ingest.screen(events, serve.ingest, serve.reaction_types)
      records = aggregate_records(
        screened.kept, self.cfg.behavior.names, "online", serve.ingest.cap, serve.reaction_types
      )
      if cfg.source == "sim" or len(records) >= cfg.min_records:
        break
      log.info("round %d: %d/%d new records; waiting", r, len(records), cfg.min_records)
      time.sleep(cfg.poll_seconds)
    if screened.flagged:
      log.warning("round %d: anomalous identities %s", r, screened.flagged)
    if screened.quarantined:
      rows = ingest.quarantine_rows(screened)
      path = self.dir / f"quarantine_round_{r:03d}.jsonl"
      path.write_text("".join(json.dumps(x) + "\n" for x in rows))
    context = self.search_result_fn()
    for rec in records:
      rec["meta"]["round"] = r
      if context is not None:
        rec["context"], source = context(rec["query"])
        if source:
          rec["source"] = source
    if not observed:
      for rec in records:
        for k, v in rec["behavior"].items():
          observed[k] = observed.get(k, 0) + v
    return records, cursor, observed, behavior_totals(records), ingest.summary(screened)


def run(cfg: Config, workdir: pathlib.Path, clients=None) -> dict:
  """The rounds (see the module docstring); returns the summary written to online_summary.json.

  `clients(url, round) -> behavior totals | None`, when given, acts on round r's answers instead of
  the simulated users (tests/test_browser.py: a person on the page, scripted in Chromium); the
  round then reads the store as `online.source` says (live: until `min_records` new records)."""
  t0 = time.perf_counter()
  on = Online(cfg, workdir)
  run_, ocfg = on.run, cfg.online
  sft_lib.sft(run_)
  disc_lib.disc_warmup(run_)
  learner = make_learner(run_)
  ckpt = Checkpointer(
    run_.workdir / "checkpoints" / "online",
    dataclasses.replace(cfg.checkpoint, every_steps=1, async_save=False),
  )
  meta = {"round": 0, "cursor": start_cursor(), "rounds": []}
  if ckpt.latest_step() is not None:
    tree, meta = ckpt.restore(learner.tree())
    learner.load(tree)
    log.info("online: resumed after round %d (step %d)", meta["round"] - 1, learner.step)
  start_round, cursor, history = meta["round"], meta["cursor"], meta["rounds"]
  if start_round and (published(run_.workdir) or {}).get("round") != start_round:
    # Resumed from an earlier checkpoint than the last published weights (a rolled-back round, or
    # a kill between checkpoint and publish): serving replicas go back to this checkpoint's model.
    publish(run_, learner.generator(), learner.step, start_round)
    write_summary(run_, history, time.perf_counter() - t0)

  # Evaluation (with a simulator): the starting policy's answers are fixed; only its users change.
  eval_model = run_.actor_model(prefer=("sft_actor",))
  queries = frozen = None
  if on.sim is not None:
    queries = evaluate.heldout_queries(run_)
    frozen = evaluate.respond(run_, eval_model, queries)

  serve_model = run_.actor_model(prefer=("sft_actor",))
  context_fn = on.search_result_fn()
  policy = ModelPolicy(serve_model, run_.tokenizer, cfg, run_.best_behavior, context_fn)
  serve_cfg = cfg.serve
  if ocfg.source == "sim":  # a free port; the simulated users all come from 127.0.0.1
    serve_cfg = dataclasses.replace(cfg.serve, port=0, address_rate=0.0)
  store = open_store(serve_cfg.store_url, run_.workdir, serve_cfg.sqlite_synchronous)
  users = None
  if ocfg.source == "sim" and serve_cfg.auth != "none" and clients is None:
    users = sim_users.SimUsers(store)  # every simulated user holds its own key
  server = make_server(serve_cfg, run_.workdir, policy, store=store).start()
  log.info("online: serving on %s (store %s)", server.url, store.where)

  writer = MetricsWriter(run_.workdir, tensorboard=cfg.log.tensorboard, stream="online")
  writer.truncate_from(learner.step + 1)
  total = ocfg.rounds * ocfg.steps_per_round
  progress = Progress(total=total, initial=learner.step, desc="online", enabled=cfg.log.progress)

  def log_step(step: int, metrics: dict, r: int) -> None:
    values = {k: float(np.asarray(v)) for k, v in metrics.items()} | {"round": r}
    writer.write(step, values)
    progress.update(
      step, {k: values[k] for k in ("reward_mean", "d_real", "d_fake") if k in values}
    )

  actor = learner.generator()
  try:
    for r in range(start_round, ocfg.rounds):
      t_round = time.perf_counter()
      policy.set_params(actor, learner.step)  # deploy
      entry = {"round": r, "model_step": learner.step}
      if on.sim is not None:
        nnx.update(eval_model, actor)
        answers = evaluate.respond(run_, eval_model, queries)
        for name, said in (("online", answers), ("frozen", frozen)):
          truth = evaluate.ground_truth(run_, queries, said, round=r)
          entry |= {f"{k}_{name}": truth[k] for k in (*evaluate.RATE_KEYS, *evaluate.CITE_KEYS)}
      records, cursor, observed, in_records, screened = on.collect(
        store, cursor, server, r, users, clients
      )
      on.save_round(r, records)
      entry["records"] = len(records)
      shown = max(observed.get("impressions", 0), 1)
      entry["like_rate_observed"] = observed.get("likes", 0) / shown
      # What the trainer learns from: the records' counts, after the screening of identities.
      entry["like_rate_records"] = in_records.get("likes", 0) / max(
        in_records.get("impressions", 0), 1
      )
      entry["quarantined_events"] = screened["quarantined_events"]
      entry["flagged_identities"] = len(screened["flagged"])
      rounds = [on.load_round(k) for k in range(r)] + [records]
      entry |= learner.train(r, rounds, log_step)
      entry["wall_seconds"] = time.perf_counter() - t_round
      history.append(entry)
      meta = {"round": r + 1, "cursor": cursor, "rounds": history}
      ckpt.save(r + 1, learner.tree(), meta, force=True)  # keyed by the rounds done
      actor = learner.generator()  # published now, deployed next round
      publish(run_, actor, learner.step, r + 1)
      write_summary(run_, history, time.perf_counter() - t0)
      progress.write(
        f"round {r}: "
        + " ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in entry.items())
      )
  finally:
    progress.close()
    writer.close()
    server.shutdown()
    if users is not None:
      users.revoke()
    store.close()
    ckpt.close()

  summary = write_summary(run_, history, time.perf_counter() - t0)
  cols = [
    "round",
    "like_rate_online",
    "like_rate_frozen",
    "like_rate_observed",
    "like_rate_records",
  ]
  cols += ["records", "quarantined_events"]
  print(format_table(history, [c for c in cols if any(c in e for e in history)]))
  print(f"online summary: {run_.workdir / 'online_summary.json'}")
  return summary


def write_summary(run_: Run, history: list[dict], wall_seconds: float) -> dict:
  """DIR/online_summary.json and, with a simulator, plots/online_like_rate.png: the rounds so far
  (written after every round, so both can be watched while the run goes on)."""
  cfg = run_.cfg
  summary = {
    "drift_round": cfg.sim.drift_round,
    "rounds": history,
    "wall_seconds": wall_seconds,  # this process's, from its start to the last round it ran
    "config": config_lib.to_configdict(cfg.online).to_dict(),
  }
  (run_.workdir / "online_summary.json").write_text(json.dumps(summary, indent=2))
  if cfg.log.plots and history and "like_rate_online" in history[0]:
    xs = [e["round"] for e in history]
    plot_series(
      run_.workdir / "plots" / "online_like_rate.png",
      {
        "online policy": (xs, [e["like_rate_online"] for e in history]),
        "frozen starting policy": (xs, [e["like_rate_frozen"] for e in history]),
      },
      title="Expected like rate on held-out queries, per round",
      xlabel="round",
      ylabel="like rate",
      vline=(cfg.sim.drift_round, "users drift") if cfg.sim.drift_round >= 0 else None,
    )
  return summary
