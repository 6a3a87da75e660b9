"""The tiny model's BPE tokenizer (rlhb_jax/sim/bpe.py)."""

import subprocess
import sys

import pytest

from rlhb_jax.data.behavior import BehaviorConfig, most_preferred_text
from rlhb_jax.data.tokenization import Tokenizer
from rlhb_jax.sim import Simulator
from rlhb_jax.sim.bpe import SPECIAL_TOKENS, tokenizer_corpus, train_bpe

_TRAIN = """
from rlhb_jax.data.behavior import BehaviorConfig
from rlhb_jax.sim import Simulator
from rlhb_jax.sim.bpe import tokenizer_corpus, train_bpe
print(train_bpe(tokenizer_corpus(Simulator(seed=0), BehaviorConfig()), 512).to_str())
"""


@pytest.fixture(scope="module")
def sim():
  return Simulator(seed=0)


@pytest.fixture(scope="module")
def tok(sim):
  return train_bpe(tokenizer_corpus(sim, BehaviorConfig()), 512)


def test_special_tokens_and_size(tok):
  assert tok.get_vocab_size() == 512
  assert [tok.token_to_id(t) for t in SPECIAL_TOKENS] == [0, 1, 2, 3, 4]
  assert SPECIAL_TOKENS == ("<pad>", "<eos>", "<bos>", "<|user|>", "<|assistant|>")


def test_deterministic_across_processes(tok):
  out = subprocess.run([sys.executable, "-c", _TRAIN], capture_output=True, text=True, check=True)
  assert out.stdout.strip() == tok.to_str()


def test_round_trip_of_simulator_text(sim, tok, tmp_path):
  texts = [*sim.queries("all")[::7], *(r["response"] for r in sim.records(400))]
  texts.append(most_preferred_text(BehaviorConfig()))
  for text in texts:
    assert tok.decode(tok.encode(" " + text).ids) == " " + text
  tok.save(str(tmp_path / "tokenizer.json"))
  wrapped = Tokenizer.from_tokenizers(tok)
  ids = wrapped.chat_prompt("What is 6 times 7?")
  assert ids[0] == 3 and ids[-1] == 4  # <|user|> ... <|assistant|>
  assert wrapped.decode([*wrapped.encode(" 6 times 7 is 42."), 1, 0]) == " 6 times 7 is 42."
  # Frequent words are single tokens: the behavior text is about one token per word.
  best = most_preferred_text(BehaviorConfig())
  assert len(tok.encode(" " + best).ids) <= len(best.split()) + 6
  assert len(tok.encode(" The capital of").ids) == 3
