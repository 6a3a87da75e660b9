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
"""

from __future__ import annotations

import functools
import logging
import pathlib
from typing import Any

import jax
import orbax.checkpoint as ocp
from flax import nnx

from rlhb_jax import roles
from rlhb_jax.config import Config
from rlhb_jax.model.llama import Transformer
from rlhb_jax.tokenization import Tokenizer


class Run:
  def __init__(self, cfg: Config, workdir: pathlib.Path):
    self.cfg = cfg
    self.workdir = pathlib.Path(workdir).absolute()
    self.workdir.mkdir(parents=True, exist_ok=True)

  # -- Models and tokenizer ---------------------------------------------------------------------------

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
    if (tok_dir / "tokenizer.json").exists():
      return Tokenizer.load(tok_dir)
    from rlhb_jax import data_prep

    tok = data_prep.train_tokenizer(self)
    tok.save(tok_dir)
    logging.info("trained a %d-token BPE on the simulator corpus: %s", tok.vocab_size, tok_dir)
    return tok

  def base_actor(self) -> Transformer:
    """The generator before any training of ours (random tiny, or the loaded checkpoint)."""
    loaded = self._checkpoint_model
    if loaded is not None:
      return loaded[0]
    return roles.build_lm(self.cfg.model, self.tokenizer.vocab_size, self.cfg.seed)[0]

  def actor_model(self, prefer: tuple[str, ...] = ("rlhb_actor", "sft_actor")) -> Transformer:
    """The newest trained generator found in the run (or the base one)."""
    model = self.base_actor()
    for name in prefer:
      params = self.load_params(name, model)
      if params is not None:
        nnx.update(model, params)
        logging.info("generator weights from %s", self.workdir / "models" / name)
        break
    return model

  # -- Stage outputs ------------------------------------------------------------------------------------

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
