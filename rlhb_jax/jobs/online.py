"""mode=online: deploy -> collect -> train, round after round, while the users drift.

Before the first round the run's offline stages give the starting policy (SFT and the warmed-up
discriminator on the logs in the run). Then each round r:

  1. deploy: the current generator answers over HTTP (the real server of `rlhb_jax.serving`, in
     this process, storing every response in the feedback store, `DIR/feedback.db` by default);
  2. collect: `online.source="sim"`: the simulator's users, with round r's segment mix, ask
     `queries_per_round` training queries through `POST /v1/generate` and report what they did
     (impressions, clicks, likes, dislikes, requeries) through `POST /v1/feedback`;
     `"live"`: wait until real clients produced `min_records` new records;
  3. aggregate: the trainer reads the store after its cursor (each event exactly once), sums each
     response's events into a log record and verbalizes it with the run's bin edges;
  4. train: `steps_per_round` RLHB steps whose data pool is the records of the last
     `window_rounds` rounds: the discriminator learns from the fresh real triplets, the generator
     is rewarded for what it says the most preferred behavior looks like now;
  5. checkpoint the state with the store cursor and the round history, and publish the weights
     (`models/online_actor`, which a separate `mode=serve` process hot-reloads).

Under LoRA (`config.lora.rank`, `config.disc.lora.rank`) the rounds train adapters only, PPO and
the per-round SFT steps alike, and what is deployed and published is the plain generator with its
adapters merged.

With a simulator, each round also scores the deployed policy and a frozen copy of the starting
policy on held-out queries (greedy, most preferred behavior) under that round's users, and writes
`DIR/online_summary.json` and `DIR/plots/online_like_rate.png`. A killed run resumes from the last
finished round: records read after that round's checkpoint are read again, and nothing that was
trained on is read twice.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import logging
import pathlib
import time
import urllib.request

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rlhb_jax import config as config_lib
from rlhb_jax.config import Config
from rlhb_jax.data.batches import Batcher, Example
from rlhb_jax.data.behavior import least_preferred_text, verbalize_records
from rlhb_jax.eval import evaluate
from rlhb_jax.infra import sharding
from rlhb_jax.infra.checkpoint import Checkpointer
from rlhb_jax.infra.metrics import MetricsWriter, Progress
from rlhb_jax.infra.report import format_table, plot_series
from rlhb_jax.methods import disc as disc_lib
from rlhb_jax.methods import sft as sft_lib
from rlhb_jax.methods.ppo import stages as ppo_stages
from rlhb_jax.model import build as build_lib
from rlhb_jax.run import Run
from rlhb_jax.serving import aggregate_records, make_server, open_store, start_cursor
from rlhb_jax.serving.policy import ModelPolicy, publish, search_result_fn
from rlhb_jax.training import optim, trainable

log = logging.getLogger(__name__)


def _post(url: str, body: dict, timeout: float = 120.0) -> dict:
  req = urllib.request.Request(
    url, json.dumps(body).encode(), {"Content-Type": "application/json"}, method="POST"
  )
  with urllib.request.urlopen(req, timeout=timeout) as resp:
    return json.loads(resp.read())


def simulate_clients(url: str, sim, queries: list[str], round: int, seed: int, threads: int):
  """The simulator's users at `round`: ask every query, then send back what they did.

  Returns the behavior counts summed over the round (what the platform observed).
  """
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


class Online:
  """The state of an online run between rounds (see the module docstring)."""

  def __init__(self, cfg: Config, workdir: pathlib.Path):
    self.cfg = cfg
    self.run = Run(cfg, workdir).prepare()
    self.dir = self.run.workdir / "online"
    self.dir.mkdir(parents=True, exist_ok=True)
    self.sim = None if cfg.data.path and cfg.online.source == "live" else self.run.simulator
    self.worst = least_preferred_text(cfg.behavior)

  def search_result_fn(self):
    """query -> the search result its answer is shown with, or None when the logs carry none."""
    return search_result_fn(self.sim) if (self.sim is not None and self.run.uses_context) else None

  def examples(self, records: list[dict]) -> list[Example]:
    texts = verbalize_records(records, self.run.binner)
    return [
      Example(r["query"], r["response"], t, r.get("context") or "")
      for r, t in zip(records, texts, strict=True)
    ]

  def round_path(self, r: int) -> pathlib.Path:
    return self.dir / f"round_{r:03d}.jsonl"

  def save_round(self, r: int, records: list[dict]) -> None:
    tmp = self.round_path(r).with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(x) + "\n" for x in records))
    tmp.replace(self.round_path(r))

  def load_round(self, r: int) -> list[dict]:
    path = self.round_path(r)
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []

  def collect(self, store, cursor: dict, server, r: int) -> tuple[list[dict], dict, dict]:
    """New records for round r: (records, cursor after them, observed behavior totals)."""
    cfg = self.cfg.online
    observed = {}
    if cfg.source == "sim":
      queries = self.sim.queries("train")
      rng = np.random.default_rng([self.cfg.seed, r, 5])
      picked = [queries[i] for i in rng.choice(len(queries), cfg.queries_per_round)]
      observed = simulate_clients(
        server.url, self.sim, picked, r, self.cfg.seed, cfg.client_threads
      )
    records: list[dict] = []
    while True:
      feed, cursor = store.read_new(cursor)
      records += aggregate_records(feed.events, self.cfg.behavior.names, source="online")
      if cfg.source == "sim" or len(records) >= cfg.min_records:
        break
      log.info("round %d: %d/%d new records; waiting", r, len(records), cfg.min_records)
      time.sleep(cfg.poll_seconds)
    context = self.search_result_fn()
    for rec in records:
      rec["meta"]["round"] = r
      if context is not None:
        rec["context"] = context(rec["query"])
    if not observed:
      for rec in records:
        for k, v in rec["behavior"].items():
          observed[k] = observed.get(k, 0) + v
    return records, cursor, observed


def run(cfg: Config, workdir: pathlib.Path) -> dict:
  t0 = time.perf_counter()
  on = Online(cfg, workdir)
  run_, ocfg = on.run, cfg.online
  sft_lib.sft(run_)
  disc_lib.disc_warmup(run_)

  base = run_.batcher  # the offline logs fix the padded lengths, so the step compiles once
  state, step_fn, mesh = ppo_stages.setup_rlhb(run_, base.rlhb(0))
  # The round's SFT steps train what PPO trains (all weights, or the adapters on the shared base),
  # on the RLHB step's layout, so the two steps hand the generator to each other as it is.
  sft_tx = optim.make_optimizer(ocfg.sft_optim, max(ocfg.rounds * ocfg.sft_steps, 1))
  sft = trainable.prepare(run_.base_actor(), cfg.lora, cfg.seed, mesh, cfg.mesh.rules, sft_tx)
  sft_state, sft_sh = trainable.supervised(sft)
  sft_state = sft_state.replace(
    params=jax.tree.map(jnp.copy, state.actor), frozen=state.frozen["actor"]
  )
  sft_graph = sft.graphdef
  rep = sharding.replicated(mesh)
  with jax.set_mesh(mesh):
    sft_state = sharding.place(sft_state, sft_sh)
  sft_fn = sft_lib.compile_sft(
    sft_graph, sft_tx, (sft_sh, trainable.batch_shardings(base.sft(0), mesh), rep)
  )
  ckpt = Checkpointer(
    run_.workdir / "checkpoints" / "online",
    dataclasses.replace(cfg.checkpoint, every_steps=1, async_save=False),
  )
  meta = {"round": 0, "cursor": start_cursor(), "rounds": []}
  if ckpt.latest_step() is not None:
    both, meta = ckpt.restore({"rlhb": state, "sft": sft_state})
    state, sft_state = both["rlhb"], both["sft"]
    log.info("online: resumed after round %d (step %d)", meta["round"] - 1, int(state.step))
  start_round, cursor, history = meta["round"], meta["cursor"], meta["rounds"]

  def generator(state):
    """The plain generator's params on the host (LoRA adapters merged into the base)."""
    return build_lib.merged_params(state.actor, state.frozen["actor"], cfg.lora)

  # Evaluation (with a simulator): the starting policy's answers are fixed; only its users change.
  eval_model = run_.actor_model(prefer=("sft_actor",))
  queries = frozen = None
  if on.sim is not None:
    queries = evaluate.heldout_queries(run_)
    frozen = evaluate.respond(run_, eval_model, queries)

  serve_model = run_.actor_model(prefer=("sft_actor",))
  context_fn = on.search_result_fn()
  policy = ModelPolicy(serve_model, run_.tokenizer, cfg, run_.best_behavior, context_fn)
  serve_cfg = cfg.serve if ocfg.source == "live" else dataclasses.replace(cfg.serve, port=0)
  store = open_store(serve_cfg.store_url, run_.workdir, serve_cfg.sqlite_synchronous)
  server = make_server(serve_cfg, run_.workdir, policy, store=store).start()
  log.info("online: serving on %s (store %s)", server.url, store.where)

  writer = MetricsWriter(run_.workdir, tensorboard=cfg.log.tensorboard, stream="online")
  writer.truncate_from(int(state.step) + 1)
  total = ocfg.rounds * ocfg.steps_per_round
  progress = Progress(total=total, initial=int(state.step), desc="online", enabled=cfg.log.progress)
  rng = jax.random.key(cfg.seed)

  def log_step(step: int, metrics: dict, r: int) -> None:
    values = {k: float(np.asarray(v)) for k, v in metrics.items()} | {"round": r}
    writer.write(step, values)
    progress.update(step, {k: values[k] for k in ("reward_mean", "d_real", "d_fake")})

  actor = generator(state)
  try:
    for r in range(start_round, ocfg.rounds):
      policy.set_params(actor, int(state.step))  # deploy
      entry = {"round": r, "model_step": int(state.step)}
      if on.sim is not None:
        nnx.update(eval_model, actor)
        answers = evaluate.respond(run_, eval_model, queries)
        online_gt = evaluate.ground_truth(run_, queries, answers, round=r)
        frozen_gt = evaluate.ground_truth(run_, queries, frozen, round=r)
        entry |= {
          "like_rate_online": online_gt["like_rate"],
          "like_rate_frozen": frozen_gt["like_rate"],
          "accuracy_online": online_gt["accuracy"],
          "accuracy_frozen": frozen_gt["accuracy"],
        }
      records, cursor, observed = on.collect(store, cursor, server, r)
      on.save_round(r, records)
      entry["records"] = len(records)
      shown = max(observed.get("impressions", 0), 1)
      entry["like_rate_observed"] = observed.get("likes", 0) / shown
      pool = [x for k in range(max(0, r - ocfg.window_rounds + 1), r) for x in on.load_round(k)]
      examples = on.examples(pool + records)
      batcher = Batcher(
        cfg, run_.tokenizer, examples, run_.best_behavior, on.worst, lengths=(base.P, base.Pd)
      )
      entry["best_pool"] = len(batcher.best_pool)
      with jax.set_mesh(mesh):
        sft_batcher = batcher
        if ocfg.sft_rows == "best":
          best = [examples[i] for i in batcher.best_pool]
          sft_batcher = (
            Batcher(
              cfg, run_.tokenizer, best, run_.best_behavior, on.worst, lengths=(base.P, base.Pd)
            )
            if best
            else None
          )
        if ocfg.sft_steps > 0 and sft_batcher is not None:
          sft_state = sft_state.replace(params=state.actor, frozen=state.frozen["actor"])
          s0 = int(sft_state.step)  # host-side step numbers: no sync inside the loops
          for i in range(ocfg.sft_steps):
            sft_state, m = sft_fn(sft_state, sft_batcher.sft(s0 + i), rng)
          bases = state.frozen | {"actor": sft_state.frozen}  # the step donated the base
          state = state.replace(actor=sft_state.params, frozen=bases)
          entry["sft_loss"] = float(m["loss"])
        s0, pending = int(state.step), None
        for i in range(ocfg.steps_per_round):
          state, metrics = step_fn(state, batcher.rlhb(s0 + i), rng)
          if pending is not None:  # step i-1's metrics, read once step i is dispatched
            log_step(*pending, r)
          pending = (s0 + i + 1, metrics)
        if pending is not None:
          log_step(*pending, r)
      # Its own copies were donated to the step.
      sft_state = sft_state.replace(params=state.actor, frozen=state.frozen["actor"])
      history.append(entry)
      meta = {"round": r + 1, "cursor": cursor, "rounds": history}
      ckpt.save(int(state.step), {"rlhb": state, "sft": sft_state}, meta, force=True)
      actor = generator(state)  # published now, deployed next round
      publish(run_, actor, int(state.step), r + 1)
      progress.write(
        f"round {r}: "
        + " ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in entry.items())
      )
  finally:
    progress.close()
    writer.close()
    server.shutdown()
    store.close()
    ckpt.close()

  summary = {
    "drift_round": cfg.sim.drift_round,
    "rounds": history,
    "wall_seconds": time.perf_counter() - t0,
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
  cols = ["round", "like_rate_online", "like_rate_frozen", "like_rate_observed", "records"]
  print(format_table(history, [c for c in cols if any(c in e for e in history)]))
  print(f"online summary: {run_.workdir / 'online_summary.json'}")
  return summary
