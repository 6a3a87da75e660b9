"""`rlhb_jax.data.batches`: fixed-shape, step-addressed batches, checked row by row."""

import numpy as np
import pytest

from rlhb_jax.config import Config, replace
from rlhb_jax.data.batches import Batcher, Example

EOS, PAD, BOS, EOT = 1, 0, 2, 3
TN = 24
BUCKETS = (16, 32, 64, 80, 128)
SHORT, LONG, SOURCES = "Likes short answers.", "Likes long answers.", "Wants sources."
BEST = "Prefers one crisp sentence."  # logged by nobody in EXAMPLES
EXAMPLES = [
  Example("what is rain?", "Water falling.", SHORT),
  Example("why is the sky blue?", "Scattering of light by air, mostly blue light.", LONG),
  Example("who wrote Hamlet?", "Shakespeare.", SOURCES, context="Hamlet, a play"),
  Example("how far is the moon?", "About 384,000 km.", SHORT),
  Example("what is a prime?", "A number with two divisors.", LONG),
  Example("boiling point of water?", "100 C at sea level.", SOURCES),
]


class FakeTokenizer:
  """Byte-level ids 5..54 (text ids never collide with the special ones 0..3)."""

  eos_ids = (EOS,)
  pad_id = PAD

  def encode(self, text):
    return [b % 50 + 5 for b in text.encode()][:100]

  def chat_prompt(self, message, system=""):
    return [BOS, *self.encode(message), EOT]


TOK = FakeTokenizer()


def config(**changes):
  return replace(
    Config(),
    **{
      "seed": 3,
      "sampling.prompt_buckets": BUCKETS,
      "sampling.max_new_tokens": TN,
      "sft.batch_size": 4,
      "disc.batch_size": 4,
      "ppo.prompts_per_step": 4,
      **changes,
    },
  )


def batcher(examples=EXAMPLES, best=BEST, worst=SOURCES, **changes):
  return Batcher(config(**changes), TOK, examples, best, worst)


# Reference encodings, written from the default prompt templates rather than through `Encoder`.
def ctx(e):
  return f" Search result: {e.context}" if e.context else ""


def prompt_ids(e, behavior):
  return TOK.chat_prompt(f"{behavior} Question: {e.query}{ctx(e)}")


def prefix_ids(e, behavior):
  return TOK.encode(f"{behavior} Question: {e.query}{ctx(e)} Answer:")


def response_ids(e):
  return [*TOK.encode(" " + e.response), EOS][:TN]


def left(ids, width):
  return [PAD] * (width - len(ids)) + list(ids)


def right(ids, width):
  return list(ids) + [PAD] * (width - len(ids))


def which(row, candidates):
  """Index of the one candidate id list equal to a padded row."""
  hits = [
    i for i, c in enumerate(candidates) if row.tolist() in (left(c, len(row)), right(c, len(row)))
  ]
  assert len(hits) == 1, (row, hits)
  return hits[0]


def equal(a, b):
  return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_reference_texts_encode_apart():
  """The fake tokenizer is lossy (bytes mod 50): make sure the test texts stay distinguishable."""
  behaviors = [SHORT, LONG, SOURCES, BEST]
  assert len({tuple(TOK.encode(b)) for b in behaviors}) == len(behaviors)
  assert len({tuple(response_ids(e)) for e in EXAMPLES}) == len(EXAMPLES)
  ended = [EOS in response_ids(e) for e in EXAMPLES]
  assert 0 < sum(ended) < len(EXAMPLES)  # some responses end with EOS, others are cut without it


@pytest.mark.parametrize("kind", ["sft", "disc", "rlhb"])
def test_a_batch_is_a_pure_function_of_the_step(kind):
  b = batcher()
  first = getattr(b, kind)(5)
  for s in range(5):
    getattr(b, kind)(s)
  np.testing.assert_equal(getattr(b, kind)(5), first)
  np.testing.assert_equal(getattr(batcher(), kind)(5), first)  # a fresh (resumed) run agrees
  assert not equal(getattr(b, kind)(4), first)
  assert not equal(getattr(b, kind)(7), first)  # (step 6 draws the same 4 rows, by chance)
  assert not equal(getattr(batcher(seed=4), kind)(5), first)


@pytest.mark.parametrize("batch_size", [4, 6, 8])
def test_every_example_once_per_epoch(batch_size):
  b = batcher(**{"sft.batch_size": batch_size})
  n, epochs = len(EXAMPLES), 4
  steps = -(-epochs * n // batch_size)
  refs = [response_ids(e) for e in EXAMPLES]
  seen = [which(row, refs) for s in range(steps) for row in b.sft(s)["response"]]
  orders = [seen[i : i + n] for i in range(0, epochs * n, n)]
  for order in orders:
    assert sorted(order) == list(range(n))
  assert len({tuple(o) for o in orders}) > 1  # each epoch is reshuffled


def test_shapes_are_fixed_across_steps():
  b = batcher()
  # The prompt bucket fits the RLHB prompts too, which carry BEST: 87 ids > 80 > 74 logged ones.
  assert max(len(prompt_ids(e, e.behavior)) for e in EXAMPLES) == 74
  assert max(len(prompt_ids(e, BEST)) for e in EXAMPLES) == 87
  P = 128
  assert b.P == P
  want = {"sft": {"prompt": (4, P), "response": (4, TN)}, "disc": {"real": (4, TN)}}
  for kind in ("sft", "disc", "rlhb"):
    shapes = {k: (v.shape, v.dtype) for k, v in getattr(b, kind)(0).items()}
    for s in range(1, 9):
      assert {k: (v.shape, v.dtype) for k, v in getattr(b, kind)(s).items()} == shapes
    for k, shape in want.get(kind, {}).items():
      assert shapes[k][0] == shape
  assert b.rlhb(0)["prompt"].shape == (4, P)


def test_sft_rows_left_pad_prompts_and_mask_only_the_response():
  b = batcher()
  for s in range(3):
    batch = b.sft(s)
    for i, e in enumerate(EXAMPLES[j] for j in b.indices(s, 4)):
      p, r = prompt_ids(e, e.behavior), response_ids(e)
      assert batch["prompt"][i].tolist() == left(p, b.P)
      assert batch["prompt_mask"][i].tolist() == [False] * (b.P - len(p)) + [True] * len(p)
      assert batch["response"][i].tolist() == right(r, TN)
      # The loss mask is exactly the response (EOS included), never prompt or padding.
      assert batch["response_mask"][i].tolist() == [True] * len(r) + [False] * (TN - len(r))
      assert (EOS in r) == (len(TOK.encode(" " + e.response)) < TN)


def test_swapped_behavior_differs_from_the_logged_one():
  b = batcher()
  behaviors = [SHORT, LONG, SOURCES, BEST]
  swaps = {i: set() for i in range(len(EXAMPLES))}
  for s in range(30):
    batch = b.disc(s)
    for row, real, resp in zip(
      batch["swap_prefix"], batch["real_prefix"], batch["real"], strict=True
    ):
      e = which(resp, [response_ids(x) for x in EXAMPLES])
      assert which(real, [prefix_ids(EXAMPLES[e], x) for x in behaviors]) == behaviors.index(
        EXAMPLES[e].behavior
      )
      swapped = behaviors[which(row, [prefix_ids(EXAMPLES[e], x) for x in behaviors])]
      assert swapped != EXAMPLES[e].behavior
      swaps[e].add(swapped)
  assert all(len(v) >= 2 for v in swaps.values())  # drawn, not one fixed replacement


def test_mismatch_negatives_pair_a_response_with_a_neighbouring_query():
  """disc.mismatch_fraction=1: every negative is the real response under another logged query
  (and its search result) with the record's own behavior; neighbours in sorted query order."""
  b = batcher(**{"disc.mismatch_fraction": 1.0})
  order = sorted(range(len(EXAMPLES)), key=lambda i: (EXAMPLES[i].query, EXAMPLES[i].context))
  partners = {i: set() for i in range(len(EXAMPLES))}
  for s in range(30):
    batch = b.disc(s)
    for row, resp in zip(batch["swap_prefix"], batch["real"], strict=True):
      e = which(resp, [response_ids(x) for x in EXAMPLES])
      o = which(row, [prefix_ids(x, EXAMPLES[e].behavior) for x in EXAMPLES])
      assert o != e
      assert abs(order.index(o) - order.index(e)) <= 3
      partners[e].add(o)
  assert all(len(v) >= 2 for v in partners.values())  # drawn, not one fixed partner


def test_mismatch_fraction_zero_keeps_the_behavior_swap_stream():
  """The option off draws nothing extra: batches equal those of a config without it."""
  on, off = batcher(**{"disc.mismatch_fraction": 0.0}), batcher()
  for s in range(5):
    assert equal(on.disc(s), off.disc(s))
  half = batcher(**{"disc.mismatch_fraction": 0.5})
  assert not all(equal(half.disc(s), off.disc(s)) for s in range(5))


def test_a_single_behavior_cannot_be_swapped():
  one = [Example(e.query, e.response, SHORT) for e in EXAMPLES]
  batch = batcher(one, best=SHORT, worst=SHORT).disc(0)
  np.testing.assert_array_equal(batch["swap_prefix"], batch["real_prefix"])


def test_rlhb_best_target_keeps_the_logged_behavior_in_real_rows():
  b = batcher()
  behaviors = [SHORT, LONG, SOURCES, BEST]
  for s in range(4):
    batch = b.rlhb(s)
    for i, e in enumerate(EXAMPLES[j] for j in b.indices(s, 4)):
      assert batch["prompt"][i].tolist() == left(prompt_ids(e, BEST), b.P)
      assert batch["prefix"][i].tolist() == left(prefix_ids(e, BEST), b.Pd)
      assert batch["contrast_prefix"][i].tolist() == left(prefix_ids(e, SOURCES), b.Pd)
      assert batch["prefix_mask"][i].sum() == len(prefix_ids(e, BEST))
    # Nobody logged BEST, so the real rows are logged triplets with their own behavior text.
    for real, resp in zip(batch["real_prefix"], batch["real"], strict=True):
      r = EXAMPLES[which(resp, [response_ids(x) for x in EXAMPLES])]
      assert real.tolist() == left(prefix_ids(r, r.behavior), b.Pd)
      assert behaviors[which(real, [prefix_ids(r, x) for x in behaviors])] != BEST


def test_rlhb_best_target_draws_real_rows_from_the_best_behavior_logs():
  b = batcher(best=SHORT, worst=LONG)
  pool = [e for e in EXAMPLES if e.behavior == SHORT]
  for s in range(4):
    batch = b.rlhb(s)
    for real, resp in zip(batch["real_prefix"], batch["real"], strict=True):
      r = pool[which(resp, [response_ids(x) for x in pool])]
      assert real.tolist() == left(prefix_ids(r, SHORT), b.Pd)
    for i, e in enumerate(EXAMPLES[j] for j in b.indices(s, 4)):
      assert batch["prefix"][i].tolist() == left(prefix_ids(e, SHORT), b.Pd)


def test_rlhb_batch_target_uses_each_records_logged_behavior():
  b = batcher(**{"rlhb.target_behavior": "batch"})
  batch = b.rlhb(2)
  for i, e in enumerate(EXAMPLES[j] for j in b.indices(2, 4)):
    assert batch["prompt"][i].tolist() == left(prompt_ids(e, e.behavior), b.P)
    assert batch["prefix"][i].tolist() == left(prefix_ids(e, e.behavior), b.Pd)
    assert batch["real"][i].tolist() == right(response_ids(e), TN)
  np.testing.assert_array_equal(batch["prefix"], batch["real_prefix"])
