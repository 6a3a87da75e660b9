"""The tiny default model's tokenizer: a byte-level BPE trained on the simulator's text.

Special tokens have fixed ids: 0 "<pad>", 1 "<eos>", 2 "<bos>", 3 "<|user|>", 4 "<|assistant|>".
Byte-level pre-tokenization (GPT-2 split, no prefix space) and decoding make decode(encode(text)) ==
text exactly for any text made of characters seen in training. The base alphabet is the characters
of the corpus, not all 256 bytes, which leaves ~190 more merges for a 512-token vocabulary; a
character never seen in training is dropped at encoding (the simulator's text has none).
Training is deterministic: same texts in the same order, same tokenizer.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from rlhb_jax.data.behavior import BehaviorConfig, verbalize
from rlhb_jax.sim.simulator import Simulator

SPECIAL_TOKENS = ("<pad>", "<eos>", "<bos>", "<|user|>", "<|assistant|>")  # ids 0 .. 4


def train_bpe(
  texts: Iterable[str], vocab_size: int, special_tokens: Sequence[str] = SPECIAL_TOKENS
) -> tokenizers.Tokenizer:
  """A byte-level BPE over `texts` with `vocab_size` tokens in all (special tokens first).

  Save it with `tok.save(path / "tokenizer.json")`; wrap it for the models with
  `rlhb_jax.data.tokenization.Tokenizer.from_tokenizers(tok)`.
  """
  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
    vocab_size=vocab_size, special_tokens=list(special_tokens), min_frequency=2, show_progress=False
  )
  tok.train_from_iterator(list(texts), trainer)
  for i, name in enumerate(special_tokens):
    assert tok.token_to_id(name) == i, f"special token {name!r} should have id {i}"
  return tok


def tokenizer_corpus(
  sim: Simulator,
  behavior: BehaviorConfig,
  extra: Sequence[str] = (),
  num_behavior_texts: int = 2000,
) -> list[str]:
  """The simulator's corpus (queries, stock sentences, log-like responses), every verbalizer phrase,
  `num_behavior_texts` sentences of random bins, and `extra` (e.g. the prompt templates' words)."""
  rng = np.random.default_rng([sim.seed, 4])
  texts = sim.corpus()
  texts += [p for t in behavior.types for p in t[2]]
  k = len(behavior.types)
  texts += [
    verbalize(rng.integers(0, behavior.num_bins, k), behavior) for _ in range(num_behavior_texts)
  ]
  return texts + list(extra)
