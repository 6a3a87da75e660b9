"""The simulated online search platform: logging policy, users, annotators, drift and ground truth.

Seeded and deterministic: the same (config, seed) gives byte-identical logs and preferences. The
ground truth (`expected_rates`, `win_prob`) takes any response string, so it also scores a policy's
decoded output: garbage, truncated or off-topic text reads as "no answer" and is rated like one.
"""

from __future__ import annotations

import datetime
import json
import pathlib

import numpy as np

from rlhb_jax.sim import policy, users
from rlhb_jax.sim.config import SimConfig
from rlhb_jax.sim.judge import Features, judge
from rlhb_jax.sim.kb import KnowledgeBase, Query


class Simulator:
  """Plays the platform of RLHB.md section 6.

  Rounds index time (one day each); the segment mix switches to `share_after` at `drift_round`.
  `round=None` in the ground truth means round 0.
  """

  def __init__(self, config: SimConfig | None = None, seed: int = 0):
    self.config = config = config or SimConfig()
    self.seed = seed
    self.kb = KnowledgeBase(config.kb_seed, config.heldout_fraction)
    self._train = self.kb.queries("train")
    styles, probs = zip(*config.style_mix, strict=True)
    self.styles: tuple[str, ...] = styles
    self._style_p = np.asarray(probs, float) / np.sum(probs)
    self._features: dict[tuple[str, str], Features] = {}

  # -- queries and responses -----------------------------------------------------------------------

  def queries(self, split: str = "train") -> list[str]:
    """Query texts of `split` ("train", "heldout" or "all") in a fixed order."""
    return [q.text for q in self.kb.queries(split)]

  def lookup(self, query: str) -> Query:
    return self.kb.lookup(query)

  def sample_style(self, rng: np.random.Generator) -> str:
    return self.styles[rng.choice(len(self.styles), p=self._style_p)]

  def respond(self, query: str, style: str, rng: np.random.Generator) -> str:
    """The logging policy's response to `query` in `style`."""
    cfg = self.config
    fact = self.lookup(query).fact
    return policy.render(
      self.kb, fact, style, rng, cfg.friendly_prob, cfg.rude_prob, cfg.citations,
      cfg.fabricated_prob,
    )  # fmt: skip

  # -- ground truth --------------------------------------------------------------------------------

  def context(self, query: str) -> str:
    """The search result shown beside the answer box: one sentence stating the fact.

    The platform's LLM answers on top of search results; logs keep what it was shown, so a model
    can learn to ground its answer in it (and held-out facts become answerable).
    """
    fact = self.lookup(query).fact
    return fact.statement.format(answer=fact.answer)

  def source(self, query: str) -> str:
    """The site the search result of `query` comes from ("" with sim.citations="any", whose
    results name no site)."""
    if self.config.citations == "any":
      return ""
    return self.kb.site(self.lookup(query).fact)

  def features(self, query: str, response: str) -> Features:
    key = (query, response)
    if key not in self._features:
      if len(self._features) > 200_000:  # bounded cache for long evaluations
        self._features.clear()
      q = self.lookup(query)
      cfg = self.config
      self._features[key] = judge(
        self.kb, q.fact, query, response, cfg.definition_recall, cfg.citations
      )
    return self._features[key]

  def segment_shares(self, round: int | None = None) -> np.ndarray:
    """Shares of the segments at `round`, shape [G], summing to one."""
    drifted = self.config.drift_round >= 0 and (round or 0) >= self.config.drift_round
    shares = np.array([s.share_after if drifted else s.share for s in self.config.segments], float)
    return shares / shares.sum()

  def satisfaction(self, query: str, response: str) -> np.ndarray:
    """Each segment's satisfaction with `response`, shape [G]."""
    f = self.features(query, response)
    return np.array([users.satisfaction(f, g, self.config.users) for g in self.config.segments])

  def segment_rates(self, query: str, response: str) -> dict[str, dict[str, float]]:
    """Per-segment per-impression rates {segment: {click, like, dislike, requery}}."""
    f = self.features(query, response)
    sat = self.satisfaction(query, response)
    return {
      g.name: users.rates(float(s), f, self.config.users)
      for g, s in zip(self.config.segments, sat, strict=True)
    }

  def expected_rates(self, query: str, response: str, round: int | None = None) -> dict[str, float]:
    """Expected per-impression rates of click, like, dislike and requery over the segment mix."""
    per_segment = self.segment_rates(query, response).values()
    shares = self.segment_shares(round)
    return {
      k: float(sum(w * r[k] for w, r in zip(shares, per_segment, strict=True))) for k in users.RATES
    }

  def ceiling(self, query: str, round: int | None = None) -> tuple[float, str]:
    """The users' ceiling on `query`: the highest expected like rate of any response the logging
    policy's templates can write (`policy.every_response`), and that response."""
    fact = self.lookup(query).fact
    best = max(
      policy.every_response(self.kb, fact),
      key=lambda r: self.expected_rates(query, r, round)["like"],
    )
    return self.expected_rates(query, best, round)["like"], best

  def win_prob(self, query: str, a: str, b: str, round: int | None = None) -> float:
    """Probability that a random user prefers response `a` over `b` (0.5 for equal utilities)."""
    diff = (
      self.satisfaction(query, a) - self.satisfaction(query, b)
    ) / self.config.users.win_temperature
    return float(np.sum(self.segment_shares(round) / (1.0 + np.exp(-diff))))

  def annotator_prob(self, query: str, a: str, b: str) -> float:
    """Probability that an offline annotator labels `a` as better than `b`."""
    ann, um = self.config.annotator, self.config.users
    ua = users.annotator_utility(self.features(query, a), ann, um)
    ub = users.annotator_utility(self.features(query, b), ann, um)
    return users.sigmoid((ua - ub) / ann.temperature)

  # -- sampling behavior ---------------------------------------------------------------------------

  def sample_impressions(self, rng: np.random.Generator) -> int:
    cfg = self.config
    return 1 + int(rng.lognormal(np.log(cfg.impressions_median), cfg.impressions_sigma))

  def sample_behavior(
    self, query: str, response: str, impressions: int, rng: np.random.Generator, round: int = 0
  ) -> dict[str, int]:
    """Behavior counts of `impressions` users shown `response` (the same user model as the logs).

    Each impression draws a segment from the mix at `round`; a record-level N(0, noise_std) shifts
    every segment's satisfaction (unobserved factors); like / dislike / neither is one categorical
    draw, click and requery are independent Bernoulli draws.
    """
    um = self.config.users
    f = self.features(query, response)
    sat = self.satisfaction(query, response) + rng.normal(0.0, um.noise_std)
    per_segment = rng.multinomial(impressions, self.segment_shares(round))
    counts = {
      "impressions": int(impressions),
      "clicks": 0,
      "likes": 0,
      "dislikes": 0,
      "requeries": 0,
    }
    for n, s in zip(per_segment, sat, strict=True):
      if n == 0:
        continue
      r = users.rates(float(s), f, um)
      like, dislike, _ = rng.multinomial(
        n, [r["like"], r["dislike"], 1.0 - r["like"] - r["dislike"]]
      )
      counts["likes"] += int(like)
      counts["dislikes"] += int(dislike)
      clicks = int(rng.binomial(n, r["click"]))
      counts["clicks"] += clicks
      if f.fabricated:  # every click on a fabricated citation is followed by a re-ask
        base = um.requery_max * users.sigmoid(um.requery_mid - float(s))
        counts["requeries"] += clicks + int(rng.binomial(n - clicks, base))
      else:
        counts["requeries"] += int(rng.binomial(n, r["requery"]))
    return counts

  # -- logs and preferences ------------------------------------------------------------------------

  def records(self, num_records: int | None = None) -> list[dict]:
    """`num_records` log records, one per distinct (query, response) of the training split.

    A pair drawn twice has its counts aggregated into the first record, as the platform would.
    """
    n = self.config.num_records if num_records is None else num_records
    rng = np.random.default_rng([self.seed, 1])
    cfg = self.config
    start = datetime.datetime.fromisoformat(cfg.start_time.replace("Z", "+00:00"))
    by_pair: dict[tuple[str, str], dict] = {}
    for _ in range(50 * n + 100):
      if len(by_pair) >= n:
        break
      i = len(by_pair)
      rnd = i * cfg.num_rounds // max(n, 1)
      q = self._train[rng.integers(len(self._train))]
      style = self.sample_style(rng)
      response = self.respond(q.text, style, rng)
      counts = self.sample_behavior(q.text, response, self.sample_impressions(rng), rng, rnd)
      old = by_pair.get((q.text, response))
      if old is not None:
        old["behavior"] = {k: v + counts[k] for k, v in old["behavior"].items()}
        continue
      when = start + datetime.timedelta(
        days=rnd, seconds=int(86400 * (i * cfg.num_rounds / max(n, 1) - rnd))
      )
      by_pair[(q.text, response)] = {
        "id": f"sim-{i:07d}",
        "query": q.text,
        "context": self.context(q.text),
        **({"source": self.source(q.text)} if self.source(q.text) else {}),
        "response": response,
        "behavior": counts,
        "timestamp": when.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "meta": {
          "source": "sim",
          "style": style,
          "correct": self.features(q.text, response).answer == "correct",
          "domain": q.fact.domain,
          "round": rnd,
        },
      }
    else:
      raise RuntimeError(f"could not draw {n} distinct (query, response) pairs")
    return list(by_pair.values())

  def preferences(self, num_pairs: int | None = None) -> list[dict]:
    """Annotator-labelled pairs {"query", "chosen", "rejected", "meta"} for the RLHF baseline."""
    n = self.config.num_preferences if num_pairs is None else num_pairs
    rng = np.random.default_rng([self.seed, 2])
    out = []
    while len(out) < n:
      q = self._train[rng.integers(len(self._train))].text
      sa, sb = self.sample_style(rng), self.sample_style(rng)
      a, b = self.respond(q, sa, rng), self.respond(q, sb, rng)
      if a == b:
        continue
      a_wins = rng.random() < self.annotator_prob(q, a, b)
      (chosen, cs), (rejected, rs) = ((a, sa), (b, sb)) if a_wins else ((b, sb), (a, sa))
      out.append(
        {
          "query": q,
          "chosen": chosen,
          "rejected": rejected,
          "meta": {"chosen_style": cs, "rejected_style": rs},
        }
      )
    return out

  def write_logs(self, path: str | pathlib.Path, num_records: int | None = None) -> int:
    return write_jsonl(path, self.records(num_records))

  def write_preferences(self, path: str | pathlib.Path, num_pairs: int | None = None) -> int:
    return write_jsonl(path, self.preferences(num_pairs))

  def corpus(self, num_responses: int = 20000) -> list[str]:
    """Tokenizer training text: every query phrasing (both splits), every stock sentence of the
    logging policy, and `num_responses` responses drawn like the logs (common words merge first)."""
    rng = np.random.default_rng([self.seed, 3])
    everything = self.kb.queries("all")
    texts = [q.text for q in everything]
    texts += [s for group in policy.stock_sentences() for s in group]
    for _ in range(num_responses):
      q = everything[rng.integers(len(everything))]
      texts.append(self.respond(q.text, self.sample_style(rng), rng))
    return texts


def write_jsonl(path: str | pathlib.Path, rows: list[dict]) -> int:
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  with path.open("w") as f:
    for row in rows:
      f.write(json.dumps(row) + "\n")
  return len(rows)


def write_large_log(
  path: str | pathlib.Path,
  num_bytes: int,
  sim: Simulator,
  base_records: int = 5000,
  bad_every: int = 0,
) -> dict[str, int]:
  """A big JSONL log for benchmarks: `base_records` simulated records repeated with fresh ids.

  Stops at the first line past `num_bytes`. With `bad_every` > 0 every such line is broken JSON.
  Returns {"records": lines written, "bytes": file size}.
  """
  bodies = []
  for rec in sim.records(base_records):
    rest = dict(rec)
    del rest["id"]
    bodies.append(", " + json.dumps(rest)[1:] + "\n")
  written = lines = 0
  with open(path, "w") as f:
    while written < num_bytes:
      chunk = []
      for body in bodies:
        lines += 1
        line = f'{{"id": "big-{lines}"' + body
        if bad_every and lines % bad_every == 0:
          line = line[: len(line) // 2] + "\n"
        chunk.append(line)
      text = "".join(chunk)
      f.write(text)
      written += len(text.encode())
  return {"records": lines, "bytes": pathlib.Path(path).stat().st_size}
