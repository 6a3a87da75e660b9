"""A run directory and what every job derives from it, built once and cached.

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
import logging
import pathlib
from typing import Any

import jax
import orbax.checkpoint as ocp
from flax import nnx

from rlhb_jax import roles, sharding
from rlhb_jax.batches import Batcher, Example
from rlhb_jax.config import Config
from rlhb_jax.model.llama import Transformer
from rlhb_jax.tokenization import Tokenizer

log = logging.getLogger(__name__)


class Run:
  def __init__(self, cfg: Config, workdir: pathlib.Path):
    self.cfg = cfg
    self.workdir = pathlib.Path(workdir).absolute()
    self.workdir.mkdir(parents=True, exist_ok=True)

  # -- Models and tokenizer ------------------------------------------------------------------------

  @functools.cached_property
  def _checkpoint_model(self) -> tuple[Transformer, Tokenizer] | None:
    if self.cfg.model.source == "tiny":
      return None
    from rlhb_jax.model import loading

    return loading.load_model(self.cfg.model)

  @functools.cached_property
  def tokenizer(self) -> Tokenizer:
    loaded = self._checkpoint_model
    if loaded is not None:
      return loaded[1]
    tok_dir = self.workdir / "tokenizer"
    if not (tok_dir / "tokenizer.json").exists() and sharding.is_primary():
      from rlhb_jax.sim.bpe import tokenizer_corpus, train_bpe

      extra = [self.cfg.prompt.generator, self.cfg.prompt.disc]
      texts = tokenizer_corpus(self.simulator, self.cfg.behavior, extra=extra)
      tok = Tokenizer.from_tokenizers(train_bpe(texts, self.cfg.model.vocab_size))
      tok.save(tok_dir)
      log.info("trained a %d-token BPE on the simulator corpus: %s", tok.vocab_size, tok_dir)
    sharding.barrier("tokenizer")
    return Tokenizer.load(tok_dir)

  def base_actor(self) -> Transformer:
    """The generator before any training of ours (random tiny, or the loaded checkpoint)."""
    loaded = self._checkpoint_model
    if loaded is not None:
      return nnx.clone(loaded[0])  # a copy: stages attach adapters to the module they get
    return roles.build_lm(self.cfg.model, self.tokenizer.vocab_size, self.cfg.seed)[0]

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
    path = self.workdir / "models" / name
    with ocp.StandardCheckpointer() as ckptr:
      ckptr.save(path, params, force=True)

  def has_params(self, name: str) -> bool:
    return (self.workdir / "models" / name).exists()

  def load_params(self, name: str, like: nnx.Module | Any) -> Any | None:
    path = self.workdir / "models" / name
    if not path.exists():
      return None
    target = roles.params_of(like) if isinstance(like, nnx.Module) else like
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), target)
    with ocp.StandardCheckpointer() as ckptr:
      return ckptr.restore(path, abstract)

  # -- Data ----------------------------------------------------------------------------------------

  @functools.cached_property
  def simulator(self):
    from rlhb_jax.sim.simulator import Simulator

    return Simulator(self.cfg.sim, self.cfg.seed)

  @functools.cached_property
  def logs_path(self) -> pathlib.Path:
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

  @functools.cached_property
  def preferences(self) -> list:
    """Pairwise preferences for RLHF: config.reward.preferences_path, or the simulator's
    annotators' (written beside simulated logs; search results attached like the logs')."""
    from rlhb_jax.baselines import read_preferences

    if self.cfg.reward.preferences_path:
      return read_preferences(self.cfg.reward.preferences_path)
    path = self.workdir / "preferences.jsonl"
    if self.cfg.data.path or not self.logs_path.exists() or not path.exists():
      raise FileNotFoundError(
        f"{path}: no preferences; set config.reward.preferences_path to a JSONL of "
        '{"query", "chosen", "rejected"}'
      )
    context_fn = self.simulator.context if self.uses_context else None
    return read_preferences(path, context_fn)

  @functools.cached_property
  def records(self) -> list[dict]:
    from rlhb_jax.data import read_records

    quarantine = self.workdir if sharding.is_primary() else None  # one author of quarantine.jsonl
    reader = read_records(self.logs_path, self.cfg.data, quarantine, self.cfg.behavior)
    records = list(reader)
    report = reader.report
    log.info(
      "logs %s: %d records ok, %d rejected%s",
      self.logs_path,
      report.records_ok,
      report.records_rejected,
      f" (quarantined in {report.quarantine_path})" if report.records_rejected else "",
    )
    return records

  @functools.cached_property
  def binner(self):
    """Bin edges fitted on the training logs, saved with the run and reused on resume."""
    from rlhb_jax.behavior import Binner

    path = self.workdir / "bin_edges.json"
    if not path.exists() and sharding.is_primary():
      Binner.fit(self.records, self.cfg.behavior).save(path)
    sharding.barrier("bin_edges")
    return Binner.load(path, self.cfg.behavior)

  @functools.cached_property
  def examples(self) -> list[Example]:
    from rlhb_jax.behavior import verbalize_records

    texts = verbalize_records(self.records, self.binner)
    return [
      Example(r["query"], r["response"], t, r.get("context") or "")
      for r, t in zip(self.records, texts, strict=True)
    ]

  @functools.cached_property
  def uses_context(self) -> bool:
    """Whether the logs carry the search result each answer was shown with."""
    return any(e.context for e in self.examples)

  @functools.cached_property
  def best_behavior(self) -> str:
    from rlhb_jax.behavior import most_preferred_text

    return most_preferred_text(self.cfg.behavior)

  @functools.cached_property
  def batcher(self) -> Batcher:
    from rlhb_jax.behavior import least_preferred_text

    worst = least_preferred_text(self.cfg.behavior)
    return Batcher(self.cfg, self.tokenizer, self.examples, self.best_behavior, worst)
