"""Host-side batches of fixed shape for SFT, discriminator warm-up and RLHB steps.

Every example is tokenized once. Lengths are fixed for the whole run (prompt and prefix buckets from
the longest example, responses cut to `sampling.max_new_tokens`), so no batch triggers a recompile.
The batch of step s depends only on (seed, s): the data position is the step, which makes resuming a
killed run exact.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterable, Sequence

import numpy as np

from rlhb_jax.config import Config


@dataclasses.dataclass(frozen=True)
class Example:
  query: str
  response: str
  behavior: str  # verbalized logged behavior
  context: str = ""  # the search result the answer was shown with, as shown (`search_result`)


def search_result(context: str, source: str = "") -> str:
  """A search result as prompts show it: its site, then its sentence ("Britannica: The capital of
  Norway is Oslo."); the sentence alone when it names no site."""
  return f"{source}: {context}" if source and context else context


def record_context(record: dict) -> str:
  """The search result a logged answer was shown with (its "context" and "source" fields)."""
  return search_result(record.get("context") or "", record.get("source") or "")


def simulator_results(simulator) -> Callable[[str], str]:
  """query -> the simulated platform's search result for it, as prompts show it."""
  return lambda query: search_result(simulator.context(query), simulator.source(query))


def _context(cfg: Config, context: str) -> str:
  return cfg.prompt.context.format(context=context) if context else ""


def generator_message(cfg: Config, query: str, behavior: str | None, context: str = "") -> str:
  if not behavior and not context:
    return query
  msg = cfg.prompt.generator.format(
    behavior=behavior or "", query=query, context=_context(cfg, context)
  )
  return msg.strip()


class Encoder:
  """Tokenizes generator prompts, discriminator prefixes and responses, with caching."""

  def __init__(self, cfg: Config, tokenizer):
    self.cfg = cfg
    self.tok = tokenizer

  @functools.lru_cache(maxsize=200_000)  # noqa: B019 (one encoder per run)
  def prompt(self, query: str, behavior: str | None, context: str = "") -> tuple[int, ...]:
    msg = generator_message(self.cfg, query, behavior, context)
    if self.cfg.prompt.chat_template:
      ids = self.tok.chat_prompt(msg, self.cfg.prompt.system)
    else:
      ids = self.tok.encode(msg)
    return tuple(ids)

  @functools.lru_cache(maxsize=200_000)  # noqa: B019
  def prefix(self, query: str, behavior: str, context: str = "") -> tuple[int, ...]:
    text = self.cfg.prompt.disc.format(
      query=query, behavior=behavior, context=_context(self.cfg, context)
    )
    return tuple(self.tok.encode(text))

  @functools.lru_cache(maxsize=200_000)  # noqa: B019
  def response(self, text: str) -> tuple[int, ...]:
    """Response ids plus EOS, cut to max_new_tokens (a cut response has no EOS, like a sample)."""
    ids = [*self.tok.encode(" " + text.strip()), self.tok.eos_ids[0]]
    return tuple(ids[: self.cfg.sampling.max_new_tokens])


def left_pad(seqs: Sequence[Sequence[int]], length: int, pad: int) -> tuple[np.ndarray, np.ndarray]:
  tokens = np.full((len(seqs), length), pad, np.int32)
  mask = np.zeros((len(seqs), length), bool)
  for i, s in enumerate(seqs):
    if len(s) > length:
      raise ValueError(f"sequence of {len(s)} tokens does not fit in {length}")
    if len(s):
      tokens[i, length - len(s) :] = s
      mask[i, length - len(s) :] = True
  return tokens, mask


def right_pad(
  seqs: Sequence[Sequence[int]], length: int, pad: int
) -> tuple[np.ndarray, np.ndarray]:
  tokens = np.full((len(seqs), length), pad, np.int32)
  mask = np.zeros((len(seqs), length), bool)
  for i, s in enumerate(seqs):
    s = list(s)[:length]
    tokens[i, : len(s)] = s
    mask[i, : len(s)] = True
  return tokens, mask


def epoch_indices(seed: int, step: int, size: int, n: int, *salt: int) -> np.ndarray:
  """Indices of the `size` items of batch `step` over n items: consecutive slices of one seeded
  permutation per epoch (every item once per epoch; a pure function of the step). `salt` keeps
  different streams of one seed apart."""
  out: list[int] = []
  start = step * size
  while len(out) < size:
    epoch, offset = divmod(start + len(out), n)
    perm = np.random.default_rng([seed, epoch, *salt]).permutation(n)
    out.extend(perm[offset : offset + size - len(out)].tolist())
  return np.asarray(out)


class Batcher:
  """Fixed-shape batches drawn from logged examples; batch(step) is a pure function of the step."""

  def __init__(
    self,
    cfg: Config,
    tokenizer,
    examples: Sequence[Example],
    best_behavior: str,
    worst_behavior: str = "",
    lengths: tuple[int, int] | None = None,
    extras: tuple[str, ...] = (),
  ):
    """`lengths` = (prompt, prefix) pins the padded lengths (e.g. to another batcher's, so a new
    data pool reuses a compiled step); an example that does not fit is an error. `extras` names
    what RLHB batches carry beyond the prompts for the reward (`RewardSource.batch_fields`):
    "query_index" (a host oracle), "rm_prefix" (a reward model's or classifier's prefix)."""
    if not examples:
      raise ValueError("no training examples")
    self.cfg = cfg
    self.extras = tuple(extras)
    self.enc = Encoder(cfg, tokenizer)
    self.examples = list(examples)
    self.best = best_behavior
    self.worst = worst_behavior or best_behavior
    self.pad = tokenizer.pad_id
    self.behaviors = sorted({e.behavior for e in self.examples})  # the swap pool: logged texts
    behaviors = sorted({*self.behaviors, best_behavior, self.worst})
    buckets = cfg.sampling.prompt_buckets
    self.P = bucket_length(
      max(
        len(self.enc.prompt(e.query, b, e.context))
        for e in self.examples
        for b in (e.behavior, self.best)
      ),
      buckets,
    )
    longest_b = max(behaviors, key=lambda b: len(self.enc.prefix("", b)))
    self.Pd = bucket_length(
      max(len(self.enc.prefix(e.query, longest_b, e.context)) for e in self.examples) + 2, buckets
    )
    if lengths is not None:
      need, pinned = (self.P, self.Pd), tuple(lengths)
      if need[0] > pinned[0] or need[1] > pinned[1]:
        raise ValueError(
          f"examples need prompt/prefix lengths {self.P}/{self.Pd}, more than the pinned "
          f"{lengths[0]}/{lengths[1]}"
        )
      self.P, self.Pd = pinned
    self.Tn = cfg.sampling.max_new_tokens

  def indices(self, step: int, size: int) -> np.ndarray:
    """Example indices of a step: consecutive slices of per-epoch permutations."""
    return epoch_indices(self.cfg.seed, step, size, len(self.examples))

  def swapped(self, example: Example, rng: np.random.Generator) -> str:
    """Another logged behavior text than the example's own (behavior-swap negative)."""
    if len(self.behaviors) == 1:
      return example.behavior
    while True:
      b = self.behaviors[rng.integers(len(self.behaviors))]
      if b != example.behavior:
        return b

  @functools.cached_property
  def _query_order(self) -> tuple[list[tuple[str, str]], dict[tuple[str, str], int]]:
    keys = sorted({(e.query, e.context) for e in self.examples})
    return keys, {k: i for i, k in enumerate(keys)}

  def mismatched(self, example: Example, rng: np.random.Generator) -> tuple[str, str] | None:
    """A nearby logged (query, context) other than the example's, for a query-mismatch negative.

    Queries sorted as text put one template with different entities side by side ("What is the
    capital of Chile?" next to "... of China?"), so a response paired with a neighbour's query is a
    hard negative: the same form, the wrong facts. The discriminator then has to check the answer
    against the query and its search result instead of learning which answers look familiar.
    """
    keys, pos = self._query_order
    i = pos[(example.query, example.context)]
    for _ in range(8):
      j = int(np.clip(i + rng.choice((-3, -2, -1, 1, 2, 3)), 0, len(keys) - 1))
      query, context = keys[j]
      if query != example.query and (not context or context != example.context):
        return query, context
    return None

  def sft(self, step: int) -> dict[str, np.ndarray]:
    """Prompt (logged behavior) + logged response; loss on response tokens only."""
    exs = [self.examples[i] for i in self.indices(step, self.cfg.sft.batch_size)]
    prompt, prompt_mask = left_pad(
      [self.enc.prompt(e.query, e.behavior, e.context) for e in exs], self.P, self.pad
    )
    resp, resp_mask = right_pad([self.enc.response(e.response) for e in exs], self.Tn, self.pad)
    return {
      "prompt": prompt,
      "prompt_mask": prompt_mask,
      "response": resp,
      "response_mask": resp_mask,
    }

  def _disc_fields(self, exs, rng, target: str | None) -> dict[str, np.ndarray]:
    real_prefix = left_pad(
      [self.enc.prefix(e.query, e.behavior, e.context) for e in exs], self.Pd, self.pad
    )
    swap_prefix = left_pad([self._negative_prefix(e, rng) for e in exs], self.Pd, self.pad)
    real = right_pad([self.enc.response(e.response) for e in exs], self.Tn, self.pad)
    out = {
      "real_prefix": real_prefix[0],
      "real_prefix_mask": real_prefix[1],
      "swap_prefix": swap_prefix[0],
      "swap_prefix_mask": swap_prefix[1],
      "real": real[0],
      "real_mask": real[1],
    }
    if target is not None:
      prefix = left_pad(
        [self.enc.prefix(e.query, target or e.behavior, e.context) for e in exs], self.Pd, self.pad
      )
      out["prefix"], out["prefix_mask"] = prefix
    return out

  def _negative_prefix(self, e: Example, rng: np.random.Generator) -> tuple[int, ...]:
    """The prefix a real response is paired with to make a fake: another behavior text or, for a
    `disc.mismatch_fraction` of rows, a neighbouring query under the record's own behavior.

    The mismatch keeps the logged behavior text so that behavior texts are spread alike over real
    and mismatched rows: under one fixed text (the most preferred, as first built) D learned that
    text means "fake" and scored real best-behavior triplets near 0.03 at the start of RLHB."""
    f = self.cfg.disc.mismatch_fraction
    if f > 0 and rng.random() < f and (other := self.mismatched(e, rng)) is not None:
      return self.enc.prefix(other[0], e.behavior, other[1])
    return self.enc.prefix(e.query, self.swapped(e, rng), e.context)

  def disc(self, step: int) -> dict[str, np.ndarray]:
    """Discriminator warm-up: real triplets and behavior-swapped ones (a `disc.mismatch_fraction`
    of those paired with a neighbouring query, under their own behavior, instead)."""
    exs = [self.examples[i] for i in self.indices(step, self.cfg.disc.batch_size)]
    rng = np.random.default_rng([self.cfg.seed, step, 1])
    return self._disc_fields(exs, rng, None)

  def rlhb(self, step: int) -> dict[str, np.ndarray]:
    """Generator prompts for the target behavior plus the discriminator's real/swap rows.

    target_behavior="batch": each prompt carries its record's logged behavior, and the real rows
    are those same records. "best": every prompt carries the most preferred behavior, and the real
    rows are drawn from the logged records with that very text (when the logs have any), so the
    discriminator cannot tell real from generated by the behavior text alone.
    """
    exs = [self.examples[i] for i in self.indices(step, self.cfg.ppo.prompts_per_step)]
    rng = np.random.default_rng([self.cfg.seed, step, 2])
    if self.cfg.rlhb.target_behavior != "best":
      out = self._disc_fields(exs, rng, "")
      prompts = [self.enc.prompt(e.query, e.behavior, e.context) for e in exs]
    else:
      pool = self.best_pool or range(len(self.examples))
      reals = [self.examples[pool[i]] for i in rng.integers(len(pool), size=len(exs))]
      out = self._disc_fields(reals, rng, None)
      gen_prefix = [self.enc.prefix(e.query, self.best, e.context) for e in exs]
      out["prefix"], out["prefix_mask"] = left_pad(gen_prefix, self.Pd, self.pad)
      prompts = [self.enc.prompt(e.query, self.best, e.context) for e in exs]
    out["prompt"], out["prompt_mask"] = left_pad(prompts, self.P, self.pad)
    contrast = [self.enc.prefix(e.query, self.worst, e.context) for e in exs]
    out["contrast_prefix"], out["contrast_prefix_mask"] = left_pad(contrast, self.Pd, self.pad)
    if "query_index" in self.extras:  # a host oracle looks the query up
      out["query_index"] = np.asarray([self.query_ids[e.query] for e in exs], np.int32)
    if "rm_prefix" in self.extras:  # a reward model or classifier reads (query, response) only
      rm = [self.enc.prefix(e.query, "", e.context) for e in exs]
      out["rm_prefix"], out["rm_prefix_mask"] = left_pad(rm, self.Pd, self.pad)
    return out

  @functools.cached_property
  def queries(self) -> list[str]:
    """The distinct logged queries in a fixed order (`query_index` of RLHB batches)."""
    return sorted({e.query for e in self.examples})

  @functools.cached_property
  def query_ids(self) -> dict[str, int]:
    return {q: i for i, q in enumerate(self.queries)}

  @functools.cached_property
  def best_pool(self) -> list[int]:
    """Indices of the logged examples whose behavior text is the most preferred one."""
    return [i for i, e in enumerate(self.examples) if e.behavior == self.best]

  def eval_prompts(
    self, queries: Sequence[str], behavior: str | None, contexts: Sequence[str] | None = None
  ) -> list[tuple[int, ...]]:
    contexts = contexts or [""] * len(queries)
    return [self.enc.prompt(q, behavior, c) for q, c in zip(queries, contexts, strict=True)]


def bucket_length(length: int, buckets: Sequence[int]) -> int:
  for b in sorted(buckets):
    if length <= b:
      return b
  raise ValueError(
    f"prompt of {length} tokens exceeds the largest bucket {max(buckets)}; "
    "raise config.sampling.prompt_buckets"
  )


def pad_prompts(
  prompts: Sequence[Sequence[int]], buckets: Sequence[int], pad_id: int
) -> tuple[np.ndarray, np.ndarray]:
  """Left-pads token lists to one bucketed length. Returns tokens (B, P) int32, mask (B, P) bool."""
  P = bucket_length(max(len(p) for p in prompts), buckets)
  tokens = np.full((len(prompts), P), pad_id, np.int32)
  mask = np.zeros((len(prompts), P), bool)
  for i, p in enumerate(prompts):
    if len(p):
      tokens[i, P - len(p) :] = p
      mask[i, P - len(p) :] = True
  return tokens, mask


class PromptedBatcher:
  """Generator prompts under the most preferred behavior, padded to one bucket for the stage."""

  def __init__(self, cfg: Config, tokenizer, behavior: str, items: Sequence, size: int):
    if not items:
      raise ValueError("no training examples for the offline stage (see its data report)")
    self.cfg, self.enc, self.behavior = cfg, Encoder(cfg, tokenizer), behavior
    self.items, self.size, self.pad = list(items), size, tokenizer.pad_id
    self.Tn = cfg.sampling.max_new_tokens
    longest = max(len(self._prompt(x)) for x in self.items)
    self.P = bucket_length(longest, cfg.sampling.prompt_buckets)

  def _prompt(self, x) -> tuple[int, ...]:
    return self.enc.prompt(x.query, self.behavior, x.context)

  def prompts(self, items: Sequence) -> dict[str, np.ndarray]:
    """{"prompt", "prompt_mask"}: the items' prompts, left-padded to the stage's bucket."""
    tokens, mask = left_pad([self._prompt(x) for x in items], self.P, self.pad)
    return {"prompt": tokens, "prompt_mask": mask}

  def answers(self, name: str, texts: Sequence[str]) -> dict[str, np.ndarray]:
    """{name, name_mask}: answers right-padded to the sampler's max_new_tokens."""
    tokens, mask = right_pad([self.enc.response(t) for t in texts], self.Tn, self.pad)
    return {name: tokens, f"{name}_mask": mask}

  def __call__(self, step: int) -> dict[str, np.ndarray]:
    idx = epoch_indices(self.cfg.seed, step, self.size, len(self.items), 47)
    return self.rows([self.items[i] for i in idx])

  def chunks(self, items: Sequence) -> Iterable[tuple[int, dict[str, np.ndarray]]]:
    """Fixed-size batches over `items` (the last one padded by repeating its first row), each with
    its number of real rows."""
    items = list(items)
    for start in range(0, len(items), self.size):
      chunk = items[start : start + self.size]
      n = len(chunk)
      yield n, self.rows(chunk + [chunk[0]] * (self.size - n))
