"""Reading any free-text response the way the simulated users do.

`judge` turns (query, response) into `Features`: whether the response gives the right answer, a
wrong one, or none at all (refusal, off-topic, garbage, truncation), its length, whether it cites a
source and whether that citation can be checked, its tone, and how garbled it is.

Citations are read one of two ways (`sim.citations`):
- "grounded" (the default): a citation is any "according to ..." / "source: ..." or any named site
  of `kb.SITES`. It is the `source` feature only when it names the site of the search result the
  answer was shown with and no other site; any other citation is `fabricated`.
- "any" (the users before 2026-12-04): any "according to" / "source" counts as `source`, and
  nothing is fabricated. The users' utilities (users.py) are functions of these
features only, so a policy's decoded output is scored exactly like a logged response.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections import Counter

from rlhb_jax.sim.kb import CASE_SENSITIVE, SITES, Fact, KnowledgeBase

_NUMBER = re.compile(r"\d+(?:,\d{3})*(?:\.\d+)?")
_WORD = re.compile(r"[A-Za-z0-9']+")
_REFUSAL = re.compile(
  r"\b(sorry|cannot|can't|can not|unable|not able|don't know|do not know|no idea)\b", re.I
)
_SOURCE = re.compile(r"\baccording to\b|\bsources?\b", re.I)
_FRIENDLY = re.compile(r"great question|happy to help|hope this helps|glad you asked", re.I)
_RUDE = re.compile(r"\bobviously\b|look it up|everyone knows|waste of time", re.I)
_STOPWORDS = frozenset(
  {
    "a",
    "an",
    "the",
    "that",
    "of",
    "and",
    "or",
    "to",
    "by",
    "with",
    "for",
    "its",
    "it",
    "into",
    "on",
    "as",
    "is",
    "are",
    "be",
    "from",
    "this",
    "those",
    "these",
    "which",
    "who",
    "when",
    "how",
    "what",
    "very",
    "often",
    "each",
    "other",
  }
)


@dataclasses.dataclass(frozen=True)
class Features:
  answer: str  # correct | wrong | none
  refusal: bool  # no answer, and the response declines
  words: int  # whitespace-separated words
  source: bool  # cites the shown result's site (with citations="any": cites anything)
  tone: int  # +1 friendly, -1 rude, 0 neutral
  garble: float  # 0 (clean text) .. 1 (repeated words or junk characters)
  fabricated: bool = False  # cites something other than the shown result's site


def judge(
  kb: KnowledgeBase,
  fact: Fact,
  query: str,
  response: str,
  recall: float = 0.75,
  citations: str = "grounded",
) -> Features:
  """Features of `response` as an answer to `query` (a phrasing of `fact`), shown with the search
  result of `kb.site(fact)`."""
  text = " ".join(response.split())
  match fact.kind:
    case "number":
      answer = _judge_number(fact, query, text)
    case "choice":
      answer = _judge_choice(kb, fact, query, text)
    case "definition":
      answer = _judge_definition(kb, fact, query, text, recall)
    case _:
      raise ValueError(f"unknown fact kind {fact.kind!r}")
  friendly, rude = bool(_FRIENDLY.search(text)), bool(_RUDE.search(text))
  if citations == "any":
    source, fabricated = bool(_SOURCE.search(text)), False
  elif citations == "grounded":
    source, fabricated = cites(text, kb.site(fact))
  else:
    raise ValueError(f"citations={citations!r}: expected 'grounded' or 'any'")
  return Features(
    answer=answer,
    refusal=answer == "none" and bool(_REFUSAL.search(text)),
    words=len(text.split()),
    source=source,
    tone=int(friendly) - int(rude),
    garble=garble(text),
    fabricated=fabricated,
  )


@functools.cache
def _site_pattern(site: str) -> re.Pattern:
  """A site's name as users recognise it: without its article, any case, as whole words."""
  return re.compile(rf"(?<![A-Za-z]){re.escape(site.removeprefix('the '))}(?![A-Za-z])", re.I)


_ALL_SITES = tuple(dict.fromkeys(s for sites in SITES.values() for s in sites))


def cites(text: str, shown: str) -> tuple[bool, bool]:
  """(grounded, fabricated) for `text` shown with a result from site `shown`: grounded when it
  names `shown` and no other site; fabricated when it cites anything else."""
  named = {s for s in _ALL_SITES if _site_pattern(s).search(text)}
  grounded = named == {shown}
  return grounded, not grounded and bool(named or _SOURCE.search(text))


def garble(text: str) -> float:
  """How broken `text` looks, in [0, 1].

  The larger of: the share of repeated words beyond what fluent short text has (30%), rescaled to
  [0, 1]; and the share of characters that are neither letters, digits, spaces nor ordinary
  punctuation. Empty text counts as fully garbled.
  """
  if not text.strip():
    return 1.0
  words = [w.lower() for w in _WORD.findall(text)]
  repeated = 1.0 - len(set(words)) / len(words) if len(words) >= 4 else 0.0
  junk = sum(not (c.isalnum() or c.isspace() or c in ".,!?'-:;()+") for c in text) / len(text)
  return float(min(1.0, max((repeated - 0.3) / 0.7, 0.0, 3.0 * junk)))


def _numbers(text: str) -> Counter[float]:
  return Counter(float(m.replace(",", "")) for m in _NUMBER.findall(text))


def _judge_number(fact: Fact, query: str, text: str) -> str:
  """Numbers that restate the question ("7 meters is 700 centimeters") are neither right nor wrong.

  The numbers of the question are removed from the response once each; what is left is the answer.
  If nothing is left but the response does not restate the whole question ("It is 32." to "64 minus
  32"), its numbers are the answer.
  """
  return _verdict(_numbers(text), _numbers(query), float(fact.value))


def _verdict(said: Counter, asked: Counter, answer: object) -> str:
  """What a response said beyond the question (each asked item removed once; all it said when it
  only restates part of the question), judged against the answer."""
  new = set(said - asked)
  if not new and not asked <= said:
    new = set(said)
  if not new:
    return "none"
  return "correct" if new == {answer} else "wrong"


@functools.cache
def _choice_pattern(names: tuple[str, ...], case_sensitive: bool) -> re.Pattern:
  alternatives = "|".join(re.escape(n) for n in sorted(names, key=len, reverse=True))
  return re.compile(rf"(?<![A-Za-z])(?:{alternatives})(?![A-Za-z])", 0 if case_sensitive else re.I)


def _judge_choice(kb: KnowledgeBase, fact: Fact, query: str, text: str) -> str:
  """Like numbers: names of the question are removed once each, the rest is the answer."""
  names = kb.choice_sets[fact.choices]
  pattern = _choice_pattern(names, fact.choices in CASE_SENSITIVE)
  fold = (lambda s: s) if fact.choices in CASE_SENSITIVE else str.lower
  asked = Counter(fold(m) for m in pattern.findall(query))
  said = Counter(fold(m) for m in pattern.findall(text))
  return _verdict(said, asked, fold(fact.answer))


def keywords(text: str) -> frozenset[str]:
  """Lower-case content words of `text` (possessives and stopwords removed)."""
  words = (w.lower().removesuffix("'s") for w in _WORD.findall(text))
  return frozenset(w for w in words if w not in _STOPWORDS and not w.isdigit())


@functools.cache
def _definition_keywords(kb: KnowledgeBase) -> dict[str, frozenset[str]]:
  return {term: keywords(d) for term, d in kb.definitions.items()}


def _judge_definition(kb: KnowledgeBase, fact: Fact, query: str, text: str, recall: float) -> str:
  said = keywords(text)
  own = fact.fact_id.removeprefix("definition:")
  scores = {t: len(said & kw) / len(kw) for t, kw in _definition_keywords(kb).items()}
  best_other = max(s for t, s in scores.items() if t != own)
  if scores[own] >= recall and scores[own] > best_other:
    return "correct"
  return "wrong" if best_other >= recall else "none"
