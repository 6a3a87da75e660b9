"""Hidden utilities of the simulated users and annotators, and the behavior rates they imply.

Satisfaction of segment g with a response of features f (judge.py):

  s_g = correct_g * c(f) + tone_g * tone(f) - garble * garble(f) - fabricated_g * fabricated(f)
        + [f answers] * (concise_g * concision(f) + source_g * source(f))

with c = +1 for the right answer, `wrong`, `refusal` or `no_answer` otherwise, and concision falling
linearly from +1 at `concise_words` to -1 at `verbose_words`. Per impression (probabilities):

  like = like_max * sigmoid(s - like_mid)        dislike = dislike_max * sigmoid(dislike_mid - s)
  requery = requery_max * sigmoid(requery_mid - s)
  click = sigmoid(click_bias + click_source * cites + click_slope * s)

where `cites` is any citation, grounded or fabricated. A user who clicks a fabricated citation finds
nothing behind it and asks again: requery becomes click + (1 - click) * requery.

Annotators score u = correct * c + per_word * min(words, max_words) + tone * tone + source * source
- garble * garble (they do not check citations), and choose A over B with probability
sigmoid((u_A - u_B) / temperature).
"""

from __future__ import annotations

import math

from rlhb_jax.sim.config import Annotator, Segment, UserModel
from rlhb_jax.sim.judge import Features

RATES = ("click", "like", "dislike", "requery")


def sigmoid(x: float) -> float:
  return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


def correctness(f: Features, um: UserModel) -> float:
  if f.answer == "correct":
    return 1.0
  if f.answer == "wrong":
    return um.wrong
  return um.refusal if f.refusal else um.no_answer


def concision(f: Features, um: UserModel) -> float:
  span = max(um.verbose_words - um.concise_words, 1)
  return min(1.0, max(-1.0, 1.0 - 2.0 * (f.words - um.concise_words) / span))


def satisfaction(f: Features, seg: Segment, um: UserModel) -> float:
  s = seg.correct * correctness(f, um) + seg.tone * f.tone - um.garble * f.garble
  if f.fabricated:
    s -= seg.fabricated
  if f.answer != "none":
    s += seg.concise * concision(f, um) + seg.source * float(f.source)
  return s


def rates(s: float, f: Features, um: UserModel) -> dict[str, float]:
  """Per-impression probabilities of click, like, dislike and requery at satisfaction `s` of a
  response with features `f`."""
  cites = f.source or f.fabricated
  out = {
    "click": sigmoid(um.click_bias + um.click_source * float(cites) + um.click_slope * s),
    "like": um.like_max * sigmoid(s - um.like_mid),
    "dislike": um.dislike_max * sigmoid(um.dislike_mid - s),
    "requery": um.requery_max * sigmoid(um.requery_mid - s),
  }
  if f.fabricated:  # the clicked citation leads nowhere: those users ask again
    out["requery"] = out["click"] + (1.0 - out["click"]) * out["requery"]
  return out


def annotator_utility(f: Features, ann: Annotator, um: UserModel) -> float:
  return (
    ann.correct * correctness(f, um)
    + ann.per_word * min(f.words, ann.max_words)
    + ann.tone * f.tone
    + ann.source * float(f.source)
    - ann.garble * f.garble
  )
