"""The model-backed serving policy: a generator behind `rlhb_jax.serving.service`.

Prompts are built exactly as in training (`batches.Encoder`: behavior text, query, optional search
result, chat template); responses are sampled with `config.sampling` in fixed-size batches, so the
jitted sampler compiles once. New weights arrive either in-process (`set_params`, what the online
loop does between rounds) or from disk: the online loop publishes `models/online_actor` plus
`models/online_actor.json` (`{"step": int, "round": int}`), and `maybe_reload` swaps them in when
the step is newer than the one serving.
"""

from __future__ import annotations

import json
import logging
import pathlib
import threading
from collections.abc import Callable
from typing import Any

import jax
from flax import nnx

from rlhb_jax.config import Config
from rlhb_jax.data.batches import Encoder, search_result
from rlhb_jax.model.sampling import generate_texts

log = logging.getLogger(__name__)

PUBLISHED = "online_actor"  # models/<PUBLISHED> and models/<PUBLISHED>.json


class ModelPolicy:
  """Serves `model` (an NNX Transformer) under the framework's prompt format.

  Args:
    model: the generator; its parameters are replaced by `set_params` / `maybe_reload`.
    tokenizer: the run's tokenizer.
    cfg: the run's config (prompt format, sampling, serve.batch_max_size).
    default_behavior: the behavior text used when a request names none (the most preferred one).
    context_fn: query -> (sentence, site) of the search result shown with the answer (("", "") for
      none); None = no search result.
    reload_fn: returns `(params, step)` of newer published weights, or None; used by `maybe_reload`.
    model_step: the step of the weights `model` holds.
  """

  def __init__(
    self,
    model: nnx.Module,
    tokenizer,
    cfg: Config,
    default_behavior: str,
    context_fn: Callable[[str], tuple[str, str]] | None = None,
    reload_fn: Callable[[int], tuple[Any, int] | None] | None = None,
    model_step: int = 0,
  ):
    self.model = model
    self.tok = tokenizer
    self.cfg = cfg
    self.enc = Encoder(cfg, tokenizer)
    self.default_behavior = default_behavior
    self.context_fn = context_fn
    self.reload_fn = reload_fn
    self.model_step = model_step
    self._calls = 0
    self._lock = threading.Lock()

  def set_params(self, params: Any, step: int) -> None:
    with self._lock:
      nnx.update(self.model, params)
      self.model_step = int(step)

  def context(self, query: str) -> str:
    """The sentence of the search result the prompt of `query` carries ("" for none)."""
    return self.context_fn(query)[0] if self.context_fn else ""

  def source(self, query: str) -> str:
    """The site of that search result ("" for none)."""
    return self.context_fn(query)[1] if self.context_fn else ""

  def generate(self, queries: list[str], behaviors: list[str | None]) -> list[str]:
    prompts = [
      self.enc.prompt(q, b or self.default_behavior, search_result(*self.context_fn(q)))
      if self.context_fn
      else self.enc.prompt(q, b or self.default_behavior, "")
      for q, b in zip(queries, behaviors, strict=True)
    ]
    with self._lock:
      self._calls += 1
      key = jax.random.fold_in(jax.random.key(self.cfg.seed + 17), self._calls)
      outs = generate_texts(
        self.model, self.tok, prompts, key, self.cfg.sampling, self.cfg.serve.batch_max_size
      )
    return [text for _, text in outs]

  def maybe_reload(self) -> bool:
    if self.reload_fn is None:
      return False
    newer = self.reload_fn(self.model_step)
    if newer is None:
      return False
    self.set_params(*newer)
    return True


def search_result_fn(simulator) -> Callable[[str], tuple[str, str]]:
  """query -> (sentence, site) of the simulator's search result for it; ("", "") for a query
  outside its knowledge base (what a person types on the feedback page usually is)."""

  def context(query: str) -> tuple[str, str]:
    try:
      return simulator.context(query), simulator.source(query)
    except KeyError:
      return "", ""

  return context


def published(workdir: pathlib.Path) -> dict | None:
  """`{"step": int, "round": int}` of the weights the online loop last published, or None."""
  path = pathlib.Path(workdir) / "models" / f"{PUBLISHED}.json"
  return json.loads(path.read_text()) if path.exists() else None


def published_step(workdir: pathlib.Path) -> int | None:
  return None if (out := published(workdir)) is None else int(out["step"])


def publish(run, params: Any, step: int, round: int) -> None:
  """Writes the weights a server should pick up: params first, then the JSON that announces them."""
  run.save_params(PUBLISHED, params)
  path = run.workdir / "models" / f"{PUBLISHED}.json"
  tmp = path.with_suffix(".json.tmp")
  tmp.write_text(json.dumps({"step": int(step), "round": int(round)}))
  tmp.replace(path)


def from_run(cfg: Config, workdir: pathlib.Path) -> ModelPolicy:
  """The policy `mode=serve` serves (`serve.policy=model`): the newest generator in the run
  (published online weights, else RLHB, else SFT), reloading when the online loop publishes
  another step (a later one, or an earlier one after a rolled-back round)."""
  from rlhb_jax.run import Run

  run = Run(cfg, workdir).prepare("tokenizer")
  model = run.actor_model(prefer=(PUBLISHED, "rlhb_actor", "sft_actor"))
  context_fn = None
  if not cfg.data.path and run.prepare().uses_context:  # the simulated platform shows its result
    context_fn = search_result_fn(run.simulator)

  def reload_fn(current: int) -> tuple[Any, int] | None:
    step = published_step(run.workdir)
    if step is None or step == current:
      return None
    params = run.load_params(PUBLISHED, model)
    return params, step

  return ModelPolicy(
    model,
    run.tokenizer,
    cfg,
    run.best_behavior,
    context_fn=context_fn,
    reload_fn=reload_fn,
    model_step=published_step(run.workdir) or 0,
  )
