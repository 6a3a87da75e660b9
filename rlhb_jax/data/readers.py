"""Streaming readers of behavior logs: JSONL (line by line), Parquet (batches), TFDS array_record.

`read_records` yields validated record dicts one at a time, so memory stays bounded for any file
size, and fills an `IngestReport` as it goes. Every line read is either yielded (records_ok) or
rejected (records_rejected): with data.on_error=fail the first bad one raises `BadRecordError`; with
quarantine it is written verbatim, with its reason, to DIR/quarantine.jsonl.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import pathlib
from collections.abc import Iterator
from typing import Any

from rlhb_jax.data.behavior import BehaviorConfig
from rlhb_jax.data.config import DataConfig
from rlhb_jax.data.validate import BadRecordError, FieldError, parse_line, validate_record

_KNOWN_FIELDS = frozenset({"id", "query", "response", "behavior", "timestamp", "meta"})


@dataclasses.dataclass
class IngestReport:
  path: str
  lines_read: int = 0  # JSONL lines, Parquet rows, TFDS examples
  records_ok: int = 0
  records_rejected: int = 0
  rejected_by_kind: collections.Counter = dataclasses.field(default_factory=collections.Counter)
  unknown_behavior_keys: collections.Counter = dataclasses.field(
    default_factory=collections.Counter
  )
  extra_fields: collections.Counter = dataclasses.field(default_factory=collections.Counter)
  quarantine_path: str | None = None
  first_errors: list[str] = dataclasses.field(default_factory=list)  # up to 10 messages

  def to_dict(self) -> dict[str, Any]:
    d = dataclasses.asdict(self)
    for k in ("rejected_by_kind", "unknown_behavior_keys", "extra_fields"):
      d[k] = dict(sorted(getattr(self, k).items()))
    return d


def detect_format(path: str | pathlib.Path, fmt: str = "auto") -> str:
  if fmt != "auto":
    return fmt
  p = pathlib.Path(path)
  if p.is_dir():
    return "tfds"
  return "parquet" if p.suffix in (".parquet", ".pq") else "jsonl"


class RecordReader:
  """Iterable over the validated records of one log; `report` is complete once iteration ends."""

  def __init__(
    self,
    path: str | pathlib.Path,
    config: DataConfig,
    workdir: pathlib.Path | None = None,
    behavior: BehaviorConfig | None = None,
  ):
    self.path = str(path)
    self.config = config
    self.behavior = behavior = behavior or BehaviorConfig()
    self.workdir = pathlib.Path(workdir) if workdir is not None else None
    self.report = IngestReport(path=self.path)
    self._known_behavior = frozenset(behavior.names)
    self._quarantine = None

  def __iter__(self) -> Iterator[dict]:
    fmt = detect_format(self.path, self.config.format)
    rows = {"jsonl": self._jsonl_rows, "parquet": self._parquet_rows, "tfds": self._tfds_rows}[
      fmt
    ]()
    try:
      for line, parse, raw in rows:
        self.report.lines_read += 1
        try:
          record = validate_record(parse(), self.behavior, self.config.missing_behavior)
        except FieldError as e:
          self._reject(line, e, raw)
          continue
        self.report.records_ok += 1
        for key in record["behavior"].keys() - self._known_behavior:
          self.report.unknown_behavior_keys[key] += 1
        for key in record.keys() - _KNOWN_FIELDS:
          self.report.extra_fields[key] += 1
        yield record
    finally:
      if self._quarantine is not None:
        self._quarantine.close()
        self._quarantine = None

  def _reject(self, line: int, e: FieldError, raw: Any) -> None:
    error = BadRecordError(self.path, line, e.field, e.kind, e.reason)
    if self.config.on_error == "fail":
      raise error
    self.report.records_rejected += 1
    self.report.rejected_by_kind[e.kind] += 1
    if len(self.report.first_errors) < 10:
      self.report.first_errors.append(str(error))
    if self.workdir is None:
      return
    if self._quarantine is None:
      qpath = self.workdir / self.config.quarantine_file
      qpath.parent.mkdir(parents=True, exist_ok=True)
      self._quarantine = qpath.open("w", encoding="utf-8")
      self.report.quarantine_path = str(qpath)
    if isinstance(raw, bytes):  # invalid UTF-8 is kept as backslash escapes
      raw = raw.decode("utf-8", errors="backslashreplace").rstrip("\r\n")
    entry = {"file": self.path, "line": line, "field": e.field, "kind": e.kind, "reason": e.reason}
    self._quarantine.write(json.dumps({**entry, "raw": raw}, ensure_ascii=False) + "\n")

  # Each row source yields (line number, thunk returning the parsed value, verbatim raw content).

  def _jsonl_rows(self):
    with open(self.path, "rb") as f:
      for line, raw in enumerate(f, start=1):
        yield line, lambda raw=raw: parse_line(raw), raw

  def _parquet_rows(self):
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(self.path)
    line = 0
    for batch in pf.iter_batches(batch_size=self.config.parquet_batch_rows):
      for row in batch.to_pylist():
        line += 1
        # A struct column holds every key of every row: a null there means "absent in this row".
        if isinstance(row.get("behavior"), dict):
          row["behavior"] = {k: v for k, v in row["behavior"].items() if v is not None}
        row = {k: v for k, v in row.items() if v is not None}
        yield line, lambda row=row: row, json.dumps(row, default=str, ensure_ascii=False)

  def _tfds_rows(self):
    from rlhb_jax.data.tfds_logs import open_tfds

    source = open_tfds(self.path)
    for i in range(len(source)):
      example = source[i]
      text = example["record"]
      text = text.decode("utf-8") if isinstance(text, bytes) else text
      yield int(example["line"]), lambda text=text: parse_line(text.encode("utf-8")), text


def read_records(
  path: str | pathlib.Path,
  config: DataConfig,
  workdir: pathlib.Path | None = None,
  behavior: BehaviorConfig | None = None,
) -> RecordReader:
  """The validated records of the log at `path` (streamed; iterate once, then read `.report`).

  Example:
    reader = read_records("logs.jsonl", config.data, workdir, config.behavior)
    records = list(reader)
    print(reader.report.records_ok, reader.report.records_rejected)
  """
  return RecordReader(path, config, workdir, behavior)
