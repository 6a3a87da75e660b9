"""A run directory and what every job derives from it.

`Run(cfg, workdir)` reads and writes nothing. Its data comes from named preparation steps that a
job calls in order with `run.prepare(...)` (each runs once; what it derives is written into the
run directory the first time and read back after, so a resumed or later job sees the same):

  logs        simulated logs and annotator preferences (unless config.data.path names logs)
  tokenizer   the checkpoint's tokenizer (and its model), or a BPE trained on the simulator corpus
  records     the logs read and validated (bad lines quarantined and counted)
  bins        behavior bin edges fitted on the records

Reading `run.tokenizer`, `run.records`, `run.binner`, ... before its step ran is an error that
names the step; what is derived from them (examples, the batcher) is computed once, without I/O.

Layout of `workdir`:
  config.json            the resolved config
  logs.jsonl             simulated behavior logs (when config.data.path is empty)
  preferences.jsonl      simulated annotator preferences (for RLHF)
  bin_edges.json         behavior bin edges fitted on the training logs
  tokenizer/             the tokenizer (trained BPE for the tiny model, or the checkpoint's)
  models/<name>/         final parameters of each stage (sft_actor, disc_warmup, rlhb_actor, ...)
  checkpoints/<stage>/   resumable Orbax checkpoints of each training stage
  <stage>.jsonl, tb/     metrics; plots/ PNGs; summary.json

With several processes (multi-host) the first one writes what every process derives alike (the
simulated logs, the tokenizer, the bin edges, the quarantine) and the others wait for it and read
it; parameters under models/ are saved by all of them together (Orbax).
"""

from __future__ import annotations

import functools
import json
import logging
import pathlib
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from rlhb_jax.config import Config
from rlhb_jax.data.batches import Batcher, Example, record_context, simulator_results
from rlhb_jax.data.tokenization import Tokenizer
from rlhb_jax.infra import sharding
from rlhb_jax.model import build as build_lib
from rlhb_jax.model.llama import Transformer

log = logging.getLogger(__name__)


class Run:
  # Each step and the steps it needs first.
  STEPS = {"logs": (), "tokenizer": (), "records": ("logs",), "bins": ("records",)}

  def __init__(self, cfg: Config, workdir: pathlib.Path):
    self.cfg = cfg
    self.workdir = pathlib.Path(workdir).absolute()
    self.workdir.mkdir(parents=True, exist_ok=True)
    self._done: dict[str, Any] = {}

  def prepare(self, *steps: str) -> Run:
    """Runs the named steps (default: all of them) and those they need, in order; returns self."""
    for name in steps or tuple(self.STEPS):
      self._step(name)
    return self

  def _step(self, name: str) -> None:
    if name not in self.STEPS:
      raise ValueError(f"Run.prepare: no step {name!r}; known: {tuple(self.STEPS)}")
    if name in self._done:
      return
    for need in self.STEPS[name]:
      self._step(need)
    self._done[name] = getattr(self, f"_{name}")()

  def _need(self, step: str) -> Any:
    if step not in self._done:
      raise RuntimeError(f"the run's {step!r} step has not run: call run.prepare({step!r}) first")
    return self._done[step]

  # -- Steps ---------------------------------------------------------------------------------------

  def _logs(self) -> pathlib.Path:
    """config.data.path, or simulated logs (and annotator preferences) written into the run."""
    if self.cfg.data.path:
      return pathlib.Path(self.cfg.data.path)
    path = self.workdir / "logs.jsonl"
    if not path.exists() and sharding.is_primary():
      self.simulator.write_preferences(self.workdir / "preferences.jsonl")
      n = self.simulator.write_logs(self.workdir / "logs.jsonl.tmp")
      (self.workdir / "logs.jsonl.tmp").rename(path)
      log.info("simulated %d log records: %s", n, path)
    sharding.barrier("logs")
    return path

  def _tokenizer(self) -> tuple[Tokenizer, Transformer | None]:
    if self.cfg.model.source != "tiny":
      from rlhb_jax.model import loading

      model, tok = loading.load_model(self.cfg.model)
      return tok, model
    tok_dir = self.workdir / "tokenizer"
    if not (tok_dir / "tokenizer.json").exists() and sharding.is_primary():
      from rlhb_jax.sim.bpe import tokenizer_corpus, train_bpe

      extra = [self.cfg.prompt.generator, self.cfg.prompt.disc]
      texts = tokenizer_corpus(self.simulator, self.cfg.behavior, extra=extra)
      tok = Tokenizer.from_tokenizers(train_bpe(texts, self.cfg.model.vocab_size))
      tok.save(tok_dir)
      log.info("trained a %d-token BPE on the simulator corpus: %s", tok.vocab_size, tok_dir)
    sharding.barrier("tokenizer")
    return Tokenizer.load(tok_dir), None

  def _records(self) -> list[dict]:
    from rlhb_jax.data import read_records

    path = self.logs_path
    quarantine = self.workdir if sharding.is_primary() else None  # one author of quarantine.jsonl
    reader = read_records(path, self.cfg.data, quarantine, self.cfg.behavior)
    records = list(reader)
    report = reader.report
    log.info(
      "logs %s: %d records ok, %d rejected%s",
      path,
      report.records_ok,
      report.records_rejected,
      f" (quarantined in {report.quarantine_path})" if report.records_rejected else "",
    )
    return records

  def _bins(self):
    """Bin edges fitted on the training logs, saved with the run and reused on resume."""
    from rlhb_jax.data.behavior import Binner

    path = self.workdir / "bin_edges.json"
    if not path.exists() and sharding.is_primary():
      Binner.fit(self.records, self.cfg.behavior).save(path)
    sharding.barrier("bin_edges")
    return Binner.load(path, self.cfg.behavior)

  # -- What the steps made -------------------------------------------------------------------------

  @property
  def logs_path(self) -> pathlib.Path:
    return self._need("logs")

  @property
  def tokenizer(self) -> Tokenizer:
    return self._need("tokenizer")[0]

  @property
  def records(self) -> list[dict]:
    return self._need("records")

  @property
  def binner(self):
    return self._need("bins")

  # -- Models --------------------------------------------------------------------------------------

  def base_actor(self) -> Transformer:
    """The generator before any training of ours (random tiny, or the loaded checkpoint)."""
    loaded = self._need("tokenizer")[1]
    if loaded is not None:
      return nnx.clone(loaded)  # a copy: stages attach adapters to the module they get
    return build_lib.build_lm(self.cfg.model, self.tokenizer.vocab_size, self.cfg.seed)[0]

  def actor_model(self, prefer: tuple[str, ...] = ("rlhb_actor", "sft_actor")) -> Transformer:
    """The newest trained generator found in the run (or the base one)."""
    model = self.base_actor()
    for name in prefer:
      params = self.load_params(name, model)
      if params is not None:
        nnx.update(model, params)
        log.info("generator weights from %s", self.workdir / "models" / name)
        break
    return model

  # -- Stage outputs -------------------------------------------------------------------------------

  def save_params(self, name: str, params: Any) -> None:
    """models/NAME: a plain model's params, written by every process together (global arrays
    such as `build_lib.merged_params` returns, or host arrays alike on every process)."""
    path = self.workdir / "models" / name
    with ocp.StandardCheckpointer() as ckptr:
      ckptr.save(path, params, force=True)

  def save_report(self, name: str, report: dict) -> None:
    """models/NAME.json: a stage's data and held-out figures, beside the model it trained."""
    if sharding.is_primary():
      (self.workdir / "models" / f"{name}.json").write_text(json.dumps(report, indent=2))

  def has_params(self, name: str) -> bool:
    return (self.workdir / "models" / name).exists()

  def load_params(self, name: str, like: nnx.Module | Any) -> Any | None:
    """models/NAME as NumPy arrays shaped like `like` (a module or a params tree), the same on
    every process whatever layout they were saved from; None when the run has no such model."""
    path = self.workdir / "models" / name
    if not path.exists():
      return None
    target = build_lib.params_of(like) if isinstance(like, nnx.Module) else like
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), target)
    args = jax.tree.map(lambda x: ocp.RestoreArgs(restore_type=np.ndarray, dtype=x.dtype), abstract)
    with ocp.Checkpointer(ocp.PyTreeCheckpointHandler()) as ckptr:
      return ckptr.restore(path, args=ocp.args.PyTreeRestore(abstract, restore_args=args))

  def read_preferences(self) -> list:
    """Pairwise preferences for RLHF: config.reward.preferences_path, or the simulator's
    annotators' (written beside simulated logs; search results attached like the logs')."""
    from rlhb_jax.data.preferences import read_preferences

    if self.cfg.reward.preferences_path:
      return read_preferences(self.cfg.reward.preferences_path)
    path = self.workdir / "preferences.jsonl"
    if self.cfg.data.path or not self.logs_path.exists() or not path.exists():
      raise FileNotFoundError(
        f"{path}: no preferences; set config.reward.preferences_path to a JSONL of "
        '{"query", "chosen", "rejected"}'
      )
    context_fn = simulator_results(self.simulator) if self.uses_context else None
    return read_preferences(path, context_fn)

  # -- Derived, without I/O ------------------------------------------------------------------------

  @functools.cached_property
  def simulator(self):
    from rlhb_jax.sim.simulator import Simulator

    return Simulator(self.cfg.sim, self.cfg.seed)

  @functools.cached_property
  def examples(self) -> list[Example]:
    from rlhb_jax.data.behavior import verbalize_records

    texts = verbalize_records(self.records, self.binner)
    return [
      Example(r["query"], r["response"], t, record_context(r))
      for r, t in zip(self.records, texts, strict=True)
    ]

  @functools.cached_property
  def uses_context(self) -> bool:
    """Whether the logs carry the search result each answer was shown with."""
    return any(e.context for e in self.examples)

  @functools.cached_property
  def best_behavior(self) -> str:
    from rlhb_jax.data.behavior import most_preferred_text

    return most_preferred_text(self.cfg.behavior)

  @functools.cached_property
  def batcher(self) -> Batcher:
    from rlhb_jax.data.behavior import least_preferred_text

    worst = least_preferred_text(self.cfg.behavior)
    return Batcher(self.cfg, self.tokenizer, self.examples, self.best_behavior, worst)
