"""Raw tables of the simulator's knowledge base, read from facts.json beside this file
(hand-written facts; generated ones live in kb.py).

Every answer here is unambiguous to the judge: capitals differ from their country's name, element
symbols are not English words, definitions are told apart by their keywords (tested in test_sim.py).
"""

import json
import pathlib

_TABLES = json.loads(pathlib.Path(__file__).with_name("facts.json").read_text(encoding="utf-8"))


def _rows(name: str) -> tuple:
  return tuple(tuple(row) if isinstance(row, list) else row for row in _TABLES[name])


CAPITALS = _rows("capitals")  # (country as it reads after "of", capital)
# (element, symbol); symbols that are English words (He, In, As, Be, I, No, At) are left out.
ELEMENTS = _rows("elements")
DEFINITIONS = _rows("definitions")  # (term with its article, bare term, definition)
EVENTS = _rows("events")  # (question clause after "did", statement with {answer}, year)
WEEKDAYS = _rows("weekdays")
MONTHS = _rows("months")
# (from unit, to unit, factor): "{v} {from} is {v * factor} {to}"
CONVERSIONS = _rows("conversions")
