"""The simulator's knowledge base: facts over seven domains, their phrasings, the held-out split.

A fact is one question with one right answer ("capital of Peru" -> "Lima"); each fact has several
phrasings, and every phrasing is a distinct query. The split is by fact, so a held-out query never
has a training query with the same answer. Generated facts (arithmetic, unit conversions) use a
fixed `kb_seed`, so the knowledge base and the split do not change with the run's seed.
"""

from __future__ import annotations

import dataclasses
import zlib

import numpy as np

from rlhb_jax.sim import facts as tables


@dataclasses.dataclass(frozen=True)
class Fact:
  """One question and its answer.

  `kind` says how the judge reads an answer: "number" (the integer `value` must be the only new
  number), "choice" (exactly one name of the set `choices`, e.g. all capitals), "definition"
  (keyword recall).
  """

  fact_id: str
  domain: str
  kind: str  # number | choice | definition
  phrasings: tuple[str, ...]
  answer: str  # the short answer as written in responses ("Lima", "700 centimeters")
  statement: str  # a full-sentence answer with an {answer} slot
  value: int = 0  # number facts: the right number
  unit: str = ""  # number facts: words after the number ("centimeters")
  choices: str = ""  # choice facts: name of the candidate set


@dataclasses.dataclass(frozen=True)
class Query:
  text: str
  fact: Fact


# Case-sensitive sets are matched as written (symbols, weekday and month names).
CASE_SENSITIVE = frozenset({"elements", "weekdays", "months"})

# The sites search results come from, per domain (`KnowledgeBase.site`). Names hold no digits, no
# answer of any fact and no chemical symbol standing alone, so citing one never reads as an answer.
SITES = {
  "capitals": ("the World Factbook", "Britannica", "National Geographic"),
  "elements": ("the Royal Society of Chemistry", "PubChem", "Chemistry LibreTexts"),
  "definitions": ("the Oxford dictionary", "Merriam-Webster", "the Cambridge Dictionary"),
  "history": ("Britannica", "the History Channel", "the BBC"),
  "calendar": ("timeanddate.com", "the Old Farmer's Almanac"),
  "arithmetic": ("Wolfram Alpha", "Khan Academy"),
  "units": ("NIST", "the Metric Conversions guide"),
}


class KnowledgeBase:
  """All facts, the query -> fact index, the candidate sets and the train / held-out split."""

  def __init__(self, kb_seed: int = 0, heldout_fraction: float = 0.1):
    rng = np.random.default_rng(kb_seed)
    self.facts: list[Fact] = [
      *_choices("capitals", "capital", tables.CAPITALS, "The capital of {x} is {{answer}}."),
      *_choices(
        "elements", "element", tables.ELEMENTS, "The chemical symbol for {x} is {{answer}}."
      ),
      *_definitions(),
      *_events(),
      *_calendar(),
      *_arithmetic(rng),
      *_conversions(),
    ]
    self.choice_sets: dict[str, tuple[str, ...]] = {
      "capitals": tuple(c for _, c in tables.CAPITALS),
      "elements": tuple(s for _, s in tables.ELEMENTS),
      "weekdays": tables.WEEKDAYS,
      "months": tables.MONTHS,
    }
    self.definitions: dict[str, str] = {term: d for _, term, d in tables.DEFINITIONS}
    self._by_query: dict[str, Query] = {}
    for fact in self.facts:
      for text in fact.phrasings:
        key = normalize_query(text)
        if key in self._by_query:
          raise ValueError(f"duplicate query {text!r}")
        self._by_query[key] = Query(text, fact)
    # Held-out facts: the same fraction of every domain, fixed by kb_seed.
    self.heldout_ids: frozenset[str] = frozenset(
      fid
      for domain in dict.fromkeys(f.domain for f in self.facts)
      for fid in _take_fraction(
        [f.fact_id for f in self.facts if f.domain == domain], heldout_fraction, rng
      )
    )

  def site(self, fact: Fact) -> str:
    """The site the search result for `fact` comes from: one of its domain's `SITES`, fixed per
    fact (a checksum of its id, so it holds across runs and seeds)."""
    sites = SITES[fact.domain]
    return sites[zlib.crc32(fact.fact_id.encode()) % len(sites)]

  @property
  def domains(self) -> tuple[str, ...]:
    return tuple(dict.fromkeys(f.domain for f in self.facts))

  def queries(self, split: str = "train") -> list[Query]:
    """Queries of `split`: "train", "heldout" or "all", in a fixed order."""
    if split not in ("train", "heldout", "all"):
      raise ValueError(f"split={split!r}: expected train, heldout or all")
    keep = lambda q: split == "all" or (q.fact.fact_id in self.heldout_ids) == (split == "heldout")
    return [q for q in self._by_query.values() if keep(q)]

  def lookup(self, query: str) -> Query:
    """The query whose text is `query` (whitespace and case insensitive); KeyError if unknown."""
    try:
      return self._by_query[normalize_query(query)]
    except KeyError:
      raise KeyError(f"query {query!r} is not in the simulator's knowledge base") from None


def normalize_query(text: str) -> str:
  return " ".join(text.lower().split())


def _take_fraction(ids: list[str], fraction: float, rng: np.random.Generator) -> list[str]:
  k = int(round(fraction * len(ids)))
  return [ids[i] for i in rng.permutation(len(ids))[:k]]


# Question templates of each domain, filled with the row's subject ({x}).
_ASK = {
  "capitals": (
    "What is the capital of {x}?",
    "Which city is the capital of {x}?",
    "Name the capital of {x}.",
    "Tell me the capital of {x}.",
  ),
  "elements": (
    "What is the chemical symbol for {x}?",
    "Which symbol stands for {x}?",
    "Give the chemical symbol of {x}.",
    "What is the symbol of {x} on the periodic table?",
  ),
  "definitions": ("What is {x}?", "Define {x}.", "What does {x} mean?", "Explain what {x} means."),
  "history": ("In what year did {x}?", "When did {x}?", "What year did {x}?"),
  "units": ("How many {to} are in {x}?", "Convert {x} to {to}.", "{x} is how many {to}?"),
}


def _ask(domain: str, x: str, **more: str) -> tuple[str, ...]:
  return tuple(p.format(x=x, **more) for p in _ASK[domain])


def _choices(domain: str, id_prefix: str, rows, statement: str) -> list[Fact]:
  """Facts of a (subject, answer) table (capitals, chemical symbols); an answer is judged as a
  choice among every answer of the table."""
  return [
    Fact(f"{id_prefix}:{x}", domain, "choice", _ask(domain, x), answer, statement.format(x=x),
         choices=domain)
    for x, answer in rows
  ]  # fmt: skip


def _definitions() -> list[Fact]:
  """Definitions: judged by keyword recall. The first phrasing takes the article ("a noun")."""
  out = []
  for with_article, term, definition in tables.DEFINITIONS:
    phrasings = (_ASK["definitions"][0].format(x=with_article), *_ask("definitions", term)[1:])
    statement = f"{with_article[0].upper()}{with_article[1:]} is {{answer}}."
    out.append(
      Fact(f"definition:{term}", "definitions", "definition", phrasings, definition, statement)
    )
  return out


def _events() -> list[Fact]:
  """Years of historical events: the year must be the only new number."""
  return [
    Fact(f"event:{clause}", "history", "number", _ask("history", clause), str(year), statement,
         value=year)
    for clause, statement, year in tables.EVENTS
  ]  # fmt: skip


def _calendar() -> list[Fact]:
  out = []
  for set_name, names, noun in (
    ("weekdays", tables.WEEKDAYS, "day"),
    ("months", tables.MONTHS, "month"),
  ):
    for i, name in enumerate(names):
      for step, rel, alt in ((1, "after", "follows"), (-1, "before", "comes just before")):
        phrasings = (
          f"What {noun} comes {rel} {name}?",
          f"Which {noun} {alt} {name}?",
          f"What is the {noun} {rel} {name}?",
        )
        answer = names[(i + step) % len(names)]
        statement = f"The {noun} {rel} {name} is {{answer}}."
        out.append(
          Fact(f"{noun}:{rel}:{name}", "calendar", "choice", phrasings, answer, statement,
               choices=set_name)
        )  # fmt: skip
  return out


_ARITHMETIC_PHRASES = {
  "plus": (
    "What is {a} plus {b}?",
    "How much is {a} plus {b}?",
    "Compute {a} + {b}.",
    "Add {a} and {b}.",
  ),
  "minus": ("What is {a} minus {b}?", "How much is {a} minus {b}?", "Subtract {b} from {a}."),
  "times": ("What is {a} times {b}?", "How much is {a} times {b}?", "Multiply {a} by {b}."),
  "divided by": (
    "What is {a} divided by {b}?",
    "How much is {a} divided by {b}?",
    "Divide {a} by {b}.",
  ),
}


def _arithmetic(rng: np.random.Generator) -> list[Fact]:
  pairs: dict[str, list[tuple[int, int]]] = {
    "plus": [(int(a), int(b)) for a, b in rng.integers(10, 100, size=(150, 2))],
    "minus": [(int(a), int(rng.integers(2, a))) for a in rng.integers(20, 100, size=100)],
    "times": [(a, b) for a in range(2, 13) for b in range(2, 13)],
    "divided by": [(int(b * q), int(b)) for b, q in rng.integers(2, 13, size=(80, 2))],
  }
  result = {
    "plus": lambda a, b: a + b,
    "minus": lambda a, b: a - b,
    "times": lambda a, b: a * b,
    "divided by": lambda a, b: a // b,
  }
  out, seen = [], set()
  for op, ab in pairs.items():
    for a, b in ab:
      if (op, a, b) in seen:
        continue
      seen.add((op, a, b))
      value = result[op](a, b)
      phrasings = tuple(p.format(a=a, b=b) for p in _ARITHMETIC_PHRASES[op])
      out.append(
        Fact(f"arith:{a} {op} {b}", "arithmetic", "number", phrasings, str(value),
             f"{a} {op} {b} is {{answer}}.", value=value)
      )  # fmt: skip
  return out


def _conversions() -> list[Fact]:
  """Unit conversions: the converted number must be the only new number."""
  return [
    Fact(f"units:{v} {frm} to {to}", "units", "number", _ask("units", f"{v} {frm}", to=to),
         f"{v * factor} {to}", f"{v} {frm} is {{answer}}.", value=v * factor, unit=to)
    for frm, to, factor in tables.CONVERSIONS
    for v in range(2, 31)
  ]  # fmt: skip
