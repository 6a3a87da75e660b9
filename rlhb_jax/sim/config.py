"""Simulator section of the config: the logging policy, the users, the annotators and drift."""

from __future__ import annotations

import dataclasses

STYLES = ("correct_concise", "correct_verbose", "correct_source", "wrong", "off_topic", "refusal")


@dataclasses.dataclass(frozen=True)
class Segment:
  """A user segment and its hidden utility: satisfaction = sum of weight * feature (users.py)."""

  name: str = "hurried"
  share: float = 0.5  # share of impressions before the drift round
  share_after: float = 0.5  # share from the drift round on
  correct: float = 3.0  # weight of correctness (+1 right, negative for wrong / no answer)
  concise: float = 1.5  # weight of concision (+1 at <= concise_words words, -1 at >= verbose_words)
  source: float = 0.3  # weight of a grounded citation (names the shown result's site)
  tone: float = 0.2  # weight of tone (+1 friendly, -1 rude)
  fabricated: float = 0.0  # penalty for a citation of anything else (sim.citations="grounded")


@dataclasses.dataclass(frozen=True)
class UserModel:
  """How satisfaction s becomes per-impression behavior probabilities (shared by all segments)."""

  wrong: float = -1.0  # correctness feature of a wrong answer
  refusal: float = -0.6  # ... of a refusal
  no_answer: float = -0.8  # ... of an off-topic, empty or truncated response
  garble: float = 4.0  # penalty per unit of garble (repeated words, junk characters)
  concise_words: int = 6  # at or below: concision +1
  verbose_words: int = 20  # at or above: concision -1
  like_max: float = 0.7  # like = like_max * sigmoid(s - like_mid)
  like_mid: float = 3.0
  dislike_max: float = 0.5  # dislike = dislike_max * sigmoid(dislike_mid - s)
  dislike_mid: float = 0.0
  requery_max: float = 0.6  # requery = requery_max * sigmoid(requery_mid - s)
  requery_mid: float = 1.0
  click_bias: float = -3.0  # click = sigmoid(click_bias + click_source * cites + click_slope * s)
  click_source: float = 2.0
  click_slope: float = 0.3
  noise_std: float = 0.5  # per-record N(0, std) added to s when sampling logs (unobserved factors)
  win_temperature: float = 1.0  # win_prob = mean over segments of sigmoid((s_a - s_b) / T)


@dataclasses.dataclass(frozen=True)
class Annotator:
  """The offline annotators' utility: the predefined preference bias (they like long answers)."""

  correct: float = 1.0  # weight of correctness (same feature as the users')
  per_word: float = 0.15  # utility per word, up to max_words
  max_words: int = 25
  source: float = 0.0
  tone: float = 0.5
  garble: float = 3.0
  temperature: float = 0.5  # P(a chosen over b) = sigmoid((u_a - u_b) / temperature)


@dataclasses.dataclass(frozen=True)
class SimConfig:
  num_records: int = 4000  # log records mode=simulate writes
  num_preferences: int = 2000  # annotator pairs mode=simulate writes (preferences.jsonl)
  kb_seed: int = 0  # fixes the generated facts and the held-out split (independent of config.seed)
  heldout_fraction: float = 0.1  # share of facts (per domain) kept out of the logs for evaluation
  # Logging policy: (style, probability); styles are those of `STYLES`.
  style_mix: tuple[tuple[str, float], ...] = (
    ("correct_concise", 0.25),
    ("correct_verbose", 0.2),
    ("correct_source", 0.15),
    ("wrong", 0.2),
    ("off_topic", 0.1),
    ("refusal", 0.1),
  )
  # How users read citations (sim/judge.py): "grounded" = only the shown result's site counts,
  # anything else is fabricated and put off the users who value sources; "any" = any "source" /
  # "according to" counts (the users of results before 2026-12-04, reproduced bit for bit).
  citations: str = "grounded"
  fabricated_prob: float = 0.25  # grounded: chance a logged citation names another site
  friendly_prob: float = 0.15  # chance an answer gets a friendly phrase
  rude_prob: float = 0.1  # chance an answer gets a rude phrase
  segments: tuple[Segment, ...] = (
    Segment("hurried", 0.5, 0.2, correct=3.0, concise=1.5, source=0.3, tone=0.2, fabricated=0.3),
    Segment("thorough", 0.3, 0.3, correct=3.0, concise=-0.5, source=1.5, tone=0.2, fabricated=2.0),
    Segment("friendly", 0.2, 0.5, correct=2.5, concise=0.5, source=0.0, tone=1.5),
  )
  users: UserModel = UserModel()
  annotator: Annotator = Annotator()
  drift_round: int = -1  # from this round on, segments use share_after; -1 = no drift
  num_rounds: int = 1  # simulated logs are spread evenly over rounds 0 .. num_rounds-1
  impressions_median: float = 60.0  # impressions per record ~ 1 + lognormal(log(median), sigma)
  impressions_sigma: float = 1.0
  definition_recall: float = 0.75  # keyword recall a definition needs to count as given
  start_time: str = "2026-11-01T00:00:00Z"  # timestamp of round 0; each round is one day

  def __post_init__(self):
    unknown = {s for s, _ in self.style_mix} - set(STYLES)
    if unknown:
      raise ValueError(f"config.sim.style_mix: unknown styles {sorted(unknown)}; known: {STYLES}")
    if not self.segments:
      raise ValueError("config.sim.segments: need at least one segment")
    if self.citations not in ("grounded", "any"):
      raise ValueError(
        f"config.sim.citations={self.citations!r}: expected 'grounded' or 'any' (sim/judge.py)"
      )
