"""Validation of one behavior-log record (RLHB.md section 7).

Error kinds (BadRecordError.kind), each with the field it names:
  invalid_utf8       the line is not UTF-8                       field "<line>"
  empty_line         the line holds only whitespace              field "<line>"
  invalid_json       the line does not parse as JSON             field "<line>"
  trailing_garbage   text after a complete JSON value            field "<line>"
  not_object         the JSON value is not an object             field "<record>"
  missing_field      id, query, response or behavior is absent   field "id" / ... / "behavior.likes"
  wrong_type         a field has the wrong JSON type             the field
  empty_query        query is empty or whitespace                field "query"
  negative_count     a behavior count is below zero              field "behavior.<type>"
  non_integer_count  a count is fractional, NaN, a bool or text  field "behavior.<type>"
Configured behavior types must be present (or count as 0 with data.missing_behavior=zero); other
behavior keys and other top-level keys are kept as they are.
"""

from __future__ import annotations

import json
import math
import pathlib
from collections.abc import Iterator
from typing import Any

from rlhb_jax.data.behavior import BehaviorConfig

_DECODER = json.JSONDecoder()


class BadRecordError(ValueError):
  """A log record that failed validation: names the file, the line, the field and the reason."""

  def __init__(self, path: str, line: int, field: str, kind: str, reason: str):
    self.path, self.line, self.field, self.kind, self.reason = path, line, field, kind, reason
    super().__init__(f"{path}:{line}: field {field!r}: {reason} [{kind}]")


class FieldError(Exception):
  """Raised inside validation; the reader adds the file and line."""

  def __init__(self, field: str, kind: str, reason: str):
    super().__init__(reason)
    self.field, self.kind, self.reason = field, kind, reason


def parse_line(raw: bytes) -> Any:
  """The JSON value of one raw line (without validation of its content)."""
  try:
    text = raw.decode("utf-8")
  except UnicodeDecodeError as e:
    raise FieldError(
      "<line>", "invalid_utf8", f"not UTF-8 ({e.reason} at byte {e.start})"
    ) from None
  text = text.strip()
  if not text:
    raise FieldError("<line>", "empty_line", "empty line")
  try:
    value, end = _DECODER.raw_decode(text)
  except json.JSONDecodeError as e:
    raise FieldError(
      "<line>", "invalid_json", f"invalid JSON: {e.msg} (column {e.colno})"
    ) from None
  if end != len(text):
    raise FieldError(
      "<line>", "trailing_garbage", f"trailing garbage after the JSON value at column {end + 1}"
    )
  return value


def _require(obj: dict, name: str, types: tuple[type, ...], type_name: str) -> Any:
  if name not in obj or obj[name] is None:
    raise FieldError(name, "missing_field", f"required field {name!r} is missing")
  value = obj[name]
  if not isinstance(value, types) or isinstance(value, bool):
    raise FieldError(name, "wrong_type", f"expected {type_name}, got {type(value).__name__}")
  return value


def _count(field: str, value: Any, real: bool) -> int | float:
  if isinstance(value, bool) or not isinstance(value, int | float):
    raise FieldError(field, "non_integer_count", f"expected a non-negative number, got {value!r}")
  if isinstance(value, float):
    if not math.isfinite(value):
      raise FieldError(field, "non_integer_count", f"expected a finite number, got {value!r}")
    if not real:
      if not value.is_integer():
        raise FieldError(field, "non_integer_count", f"count must be an integer, got {value!r}")
      value = int(value)
  if value < 0:
    raise FieldError(field, "negative_count", f"count must be >= 0, got {value!r}")
  return value


def validate_record(obj: Any, behavior: BehaviorConfig, missing_behavior: str = "error") -> dict:
  """The record with counts as ints (integral floats converted); raises FieldError."""
  if not isinstance(obj, dict):
    raise FieldError("<record>", "not_object", f"expected a JSON object, got {type(obj).__name__}")
  _require(obj, "id", (str, int), "string or integer")
  query = _require(obj, "query", (str,), "string")
  _require(obj, "response", (str,), "string")
  counts = _require(obj, "behavior", (dict,), "object")
  if not query.strip():
    raise FieldError("query", "empty_query", "query is empty")
  for name in ("timestamp", "context", "source"):
    if obj.get(name) is not None and not isinstance(obj[name], str):
      raise FieldError(name, "wrong_type", f"expected string, got {type(obj[name]).__name__}")
  if obj.get("meta") is not None and not isinstance(obj["meta"], dict):
    raise FieldError("meta", "wrong_type", f"expected object, got {type(obj['meta']).__name__}")
  clean = dict(counts)
  for name in behavior.names:
    field = f"behavior.{name}"
    if counts.get(name) is None:
      if missing_behavior == "error":
        raise FieldError(field, "missing_field", f"behavior type {name!r} is missing")
      clean[name] = 0
      continue
    clean[name] = _count(field, counts[name], name in behavior.real_valued)
  out = dict(obj)
  out["behavior"] = clean
  return out


def read_json_objects(path: str | pathlib.Path) -> Iterator[tuple[int, dict]]:
  """(line number, object) of each non-blank line of a small JSONL file (prompts, preference
  pairs); a line that is not a JSON object is a BadRecordError naming the file and line."""
  with open(path, encoding="utf-8") as f:
    for i, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        row = json.loads(line)
      except json.JSONDecodeError as e:
        raise BadRecordError(str(path), i, "<line>", "json", f"invalid JSON: {e.msg}") from None
      if not isinstance(row, dict):
        raise BadRecordError(str(path), i, "<line>", "type", "expected a JSON object")
      yield i, row


def text_field(path: str | pathlib.Path, line: int, row: dict, field: str, required: bool) -> Any:
  """row[field]: a non-empty string when required, else a string or None (BadRecordError if not)."""
  value = row.get(field)
  if required and (not isinstance(value, str) or not value.strip()):
    kind = "missing" if value is None else "type"
    raise BadRecordError(str(path), line, field, kind, "expected a non-empty string")
  if not required and value is not None and not isinstance(value, str):
    raise BadRecordError(str(path), line, field, "type", "expected a string")
  return value
