"""The logging policy: the responses the platform showed, in six styles.

Styles: correct_concise, correct_verbose, correct_source, wrong (concise, verbose or sourced, with a
wrong answer), off_topic, refusal. Any answer may also get a friendly or a rude phrase. Fillers and
stock sentences hold no digits and no candidate names, so the judge reads only the answer.
Lengths: concise <= 10 words, verbose about 12-22 words (the tiny model decodes ~32 tokens).
"""

from __future__ import annotations

import numpy as np

from rlhb_jax.sim.kb import SITES, Fact, KnowledgeBase

_FILLERS = {
  "capitals": (
    "It is home to the national government.",
    "Most embassies of the country are there.",
    "It is a well known city.",
  ),
  "elements": ("Chemists use it in formulas.", "You can find it on the periodic table."),
  "definitions": ("This is the usual school definition.", "The word is common in everyday speech."),
  "history": ("It was a major turning point.", "It shaped the modern world."),
  "calendar": ("The order is the same every year.", "This is the usual calendar order."),
  "arithmetic": ("You can check it with a calculator.", "This is easy to verify on paper."),
  "units": (
    "This uses the standard conversion factor.",
    "You can check it with a conversion table.",
  ),
}
# What citations name with sim.citations="any" (the logs before 2026-12-04); "grounded" logs cite
# the shown result's site (`KnowledgeBase.site`), or another site of the domain (`fabricated_prob`).
_SOURCES = {
  "capitals": ("the World Factbook", "Britannica", "a world atlas"),
  "elements": ("the periodic table", "a chemistry textbook"),
  "definitions": ("the Oxford dictionary", "Merriam-Webster"),
  "history": ("Britannica", "a history textbook"),
  "calendar": ("the Gregorian calendar",),
  "arithmetic": ("a math textbook",),
  "units": ("the SI unit tables", "a conversion table"),
}
_OPENERS = ("", "", "Here is the answer. ", "Let me explain. ")
_OFF_TOPIC = (
  "I really enjoy long walks in the park on sunny days.",
  "Have you tried the new pasta recipe everyone is talking about?",
  "Music can make a boring afternoon feel much better.",
  "My favorite color has always been green.",
  "There are many good films to watch this weekend.",
  "Cats sleep for a large part of the day.",
  "Traveling by train is a relaxing way to see the countryside.",
)
_REFUSALS = (
  "Sorry, I cannot help with that.",
  "I am not able to answer this question.",
  "I don't know the answer to that.",
  "I'm sorry, but I can't answer that right now.",
)
_STOCK_STARTS = frozenset({"The", "It", "According", "Here", "Let", "A", "An"})
_FRIENDLY = (("Great question! ", ""), ("Happy to help! ", ""), ("", " Hope this helps!"))
_RUDE = (("Obviously, ", ""), ("", " Look it up next time."), ("Everyone knows this. ", ""))


def wrong_answer(kb: KnowledgeBase, fact: Fact, rng: np.random.Generator) -> str:
  """A plausible wrong answer of the same kind as the right one."""
  match fact.kind:
    case "number":
      spread = 30 if fact.domain == "history" else max(3, fact.value // 5)
      delta = int(rng.integers(1, spread + 1)) * (
        1 if rng.random() < 0.5 or fact.value <= spread else -1
      )
      value = fact.value + delta
      return f"{value} {fact.unit}".strip()
    case "choice":
      asked = set(fact.phrasings[0].replace("?", " ").split())
      names = [n for n in kb.choice_sets[fact.choices] if n != fact.answer and n not in asked]
      return names[rng.integers(len(names))]
    case _:
      own = fact.fact_id.removeprefix("definition:")
      others = [d for t, d in kb.definitions.items() if t != own]
      return others[rng.integers(len(others))]


def _pick(options, rng: np.random.Generator):
  return options[rng.integers(len(options))]


def _capitalize(text: str) -> str:
  return text[:1].upper() + text[1:]


def render(
  kb: KnowledgeBase,
  fact: Fact,
  style: str,
  rng: np.random.Generator,
  friendly_prob: float = 0.0,
  rude_prob: float = 0.0,
  citations: str = "any",
  fabricated_prob: float = 0.0,
) -> str:
  """One response to `fact` in `style`; a citation is written as `citations` users read it."""
  if style == "off_topic":
    return _pick(_OFF_TOPIC, rng)
  if style == "refusal":
    return _pick(_REFUSALS, rng)
  if style == "wrong":
    answer, form = wrong_answer(kb, fact, rng), _pick(("concise", "verbose", "source"), rng)
  else:
    answer, form = fact.answer, style.removeprefix("correct_")
  statement = fact.statement.format(answer=answer)
  match form:
    case "concise":
      short = _capitalize(answer) + "."
      text = _pick(
        (short, statement) if fact.kind == "definition" else (short, statement, f"It is {answer}."),
        rng,
      )
    case "verbose":
      text = _pick(_OPENERS, rng) + statement + " " + _pick(_FILLERS[fact.domain], rng)
    case "source":
      source = cited_site(kb, fact, rng, fabricated_prob) if citations == "grounded" else None
      source = source or _pick(_SOURCES[fact.domain], rng)
      if rng.random() < 0.5:
        text = f"According to {source}, {statement[0].lower() + statement[1:]}"
      else:
        text = f"{statement} Source: {source}."
    case _:
      raise ValueError(f"unknown style {style!r}")
  u = rng.random()
  if u < friendly_prob:
    before, after = _pick(_FRIENDLY, rng)
  elif u < friendly_prob + rude_prob:
    before, after = _pick(_RUDE, rng)
  else:
    before, after = "", ""
  if before.startswith("Obviously") and text.split()[0] in _STOCK_STARTS:
    text = text[0].lower() + text[1:]
  return before + text + after


def cited_site(kb: KnowledgeBase, fact: Fact, rng: np.random.Generator, fabricated: float) -> str:
  """The site a grounded log's citation names: the shown result's, or with probability
  `fabricated` another site of the fact's domain."""
  shown = kb.site(fact)
  if rng.random() >= fabricated:
    return shown
  return _pick([s for s in SITES[fact.domain] if s != shown], rng)


def stock_sentences() -> list[tuple[str, ...]]:
  """Every fixed sentence and phrase the policy uses (for tokenizer training)."""
  pieces = [*_FILLERS.values(), *_SOURCES.values(), *SITES.values(), _OPENERS, _OFF_TOPIC]
  pieces.append(_REFUSALS)
  pieces += [tuple(b + a for b, a in _FRIENDLY), tuple(b + a for b, a in _RUDE)]
  return pieces


def every_response(kb: KnowledgeBase, fact: Fact, wrong_samples: int = 3) -> list[str]:
  """Every response `render` can write for `fact`, in every style, citation and tone: the set the
  users' ceiling is the best of (`Simulator.ceiling`). Wrong answers are drawn: `wrong_samples` of
  them (each in every form), from a generator fixed by the fact."""
  statement = fact.statement.format(answer="{answer}")

  def forms(answer: str) -> list[str]:
    said = statement.format(answer=answer)
    concise = [_capitalize(answer) + ".", said]
    if fact.kind != "definition":
      concise.append(f"It is {answer}.")
    verbose = [o + said + " " + f for o in dict.fromkeys(_OPENERS) for f in _FILLERS[fact.domain]]
    sources = dict.fromkeys((*SITES[fact.domain], *_SOURCES[fact.domain]))
    cited = [f"According to {s}, {said[0].lower() + said[1:]}" for s in sources]
    cited += [f"{said} Source: {s}." for s in sources]
    return concise + verbose + cited

  rng = np.random.default_rng(sum(map(ord, fact.fact_id)))
  wrong = dict.fromkeys(wrong_answer(kb, fact, rng) for _ in range(wrong_samples))
  texts = forms(fact.answer) + [t for w in wrong for t in forms(w)]
  texts += [*_OFF_TOPIC, *_REFUSALS]
  out = []
  for text in texts:
    for before, after in (("", ""), *_FRIENDLY, *_RUDE):
      lead = text[0].lower() + text[1:] if before.startswith("Obviously") else text
      if before.startswith("Obviously") and text.split()[0] not in _STOCK_STARTS:
        lead = text
      out.append(before + lead + after)
  return list(dict.fromkeys(out))
